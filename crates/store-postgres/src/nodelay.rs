//! Turns Nagle's algorithm off on each new connection's TCP socket.
//!
//! sqlx 0.9.0 opens its TCP connections without `TCP_NODELAY` (sqlx issue #4335; 0.8 set it,
//! and the fix, pull request #4336, is not released yet). A request whose last bytes wait for
//! the server's delayed ACK then takes about 40 ms more: a batch of logins took 40 ms where
//! PostgreSQL spent 3 ms on it, and `acl-confirm` over TCP ran at a fifth of its rate over a
//! Unix socket.
//! sqlx gives no access to its socket, so this finds it among the process's open descriptors:
//! the socket whose local port is the one the server sees as the client's, and whose peer port
//! is the server's. Remove this module once sqlx sets the option itself again.

use sqlx::PgConnection;

/// Sets `TCP_NODELAY` on `conn`'s socket. A connection over a Unix socket, or whose socket
/// cannot be told apart (a proxy between us and the server), is left as it is; so is one to a
/// server that cannot name the ports (another server speaking PostgreSQL's protocol): this
/// never fails a connection.
pub(crate) async fn disable_nagle(conn: &mut PgConnection) -> Result<(), sqlx::Error> {
    let (local, peer) = match ports_of(conn).await {
        Ok(Some(ports)) => ports,
        Ok(None) => return Ok(()),
        Err(e) => {
            tracing::debug!(error = %e, "the server did not name the connection's ports");
            return Ok(());
        }
    };
    let set = with_socket_between(local, peer, |socket| socket.set_tcp_nodelay(true).is_ok());
    if set != Some(true) {
        tracing::debug!(
            local,
            peer,
            "no socket of this connection found; Nagle's algorithm stays on"
        );
    }
    Ok(())
}

/// The connection's local and peer TCP ports as the server sees them (`None` over a Unix
/// socket).
async fn ports_of(conn: &mut PgConnection) -> Result<Option<(u16, u16)>, sqlx::Error> {
    let (client_port, server_port): (Option<i32>, Option<i32>) =
        sqlx::query_as("SELECT inet_client_port(), inet_server_port()")
            .fetch_one(conn)
            .await?;
    Ok(client_port
        .zip(server_port)
        .and_then(|(c, s)| Some((u16::try_from(c).ok()?, u16::try_from(s).ok()?))))
}

/// Runs `act` on this process's TCP socket from local port `local` to peer port `peer`, if
/// there is one.
#[cfg(target_os = "linux")]
fn with_socket_between<T>(
    local: u16,
    peer: u16,
    act: impl FnOnce(socket2::SockRef<'_>) -> T,
) -> Option<T> {
    use std::os::fd::BorrowedFd;

    let descriptors = std::fs::read_dir("/proc/self/fd").ok()?;
    for entry in descriptors.flatten() {
        let Some(fd) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        // SAFETY: the descriptor is only borrowed for the two address queries and `act`.
        // Should another thread close it meanwhile (and the number be reused), the calls fail
        // or meet another descriptor, which is acted on only if it is a TCP socket with
        // exactly these two ports.
        let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
        let socket = socket2::SockRef::from(&borrowed);
        let port_of = |addr: std::io::Result<socket2::SockAddr>| {
            addr.ok().and_then(|a| a.as_socket()).map(|a| a.port())
        };
        if port_of(socket.local_addr()) == Some(local) && port_of(socket.peer_addr()) == Some(peer)
        {
            return Some(act(socket));
        }
    }
    None
}

#[cfg(not(target_os = "linux"))]
fn with_socket_between<T>(
    _local: u16,
    _peer: u16,
    _act: impl FnOnce(socket2::SockRef<'_>) -> T,
) -> Option<T> {
    None
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;
    use crate::testing::{TestDatabase, test_server_url};
    use crate::{PgSettings, PgStore};
    use sqlx::Connection;

    /// Whether the connection's socket has `TCP_NODELAY` (`None`: no socket found).
    async fn nodelay_of(conn: &mut PgConnection) -> Result<Option<bool>, String> {
        let Some((local, peer)) = ports_of(conn).await.map_err(|e| e.to_string())? else {
            return Ok(None);
        };
        with_socket_between(local, peer, |s| s.tcp_nodelay())
            .transpose()
            .map_err(|e| e.to_string())
    }

    #[tokio::test]
    async fn every_pooled_connection_sends_without_waiting_for_acks() {
        // Arrange: a TCP server (the tests' URL names a host and port).
        let Some(url) = test_server_url().unwrap() else {
            return;
        };
        let db = TestDatabase::create(&url).await.unwrap();
        let mut bare = PgConnection::connect(&db.url).await.unwrap();
        // Act
        let before = nodelay_of(&mut bare).await.unwrap();
        disable_nagle(&mut bare).await.unwrap();
        let after = nodelay_of(&mut bare).await.unwrap();
        let store = PgStore::connect(&PgSettings::new(db.url.clone()))
            .await
            .unwrap();
        let mut pooled = store.pool().acquire().await.unwrap();
        let in_pool = nodelay_of(&mut pooled).await.unwrap();
        // Assert: sqlx leaves Nagle on (if a release turns it off, this module can go), the
        // socket is found and changed, and the store's pool does it for each connection.
        assert_eq!(before, Some(false));
        assert_eq!(after, Some(true));
        assert_eq!(in_pool, Some(true));
    }
}
