//! The load loop: a fixed number of HTTP/1.1 keep-alive connections over loopback, each sending
//! its next request as soon as the previous answer is read, until the deadline or the fixtures
//! run out. Every answer is checked; latencies are kept per request (microseconds).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::scenario::Fixtures;

/// What one load run measured.
#[derive(Debug, Default)]
pub struct Measured {
    /// Latency of every answered request, microseconds, sorted.
    pub latencies_us: Vec<u32>,
    /// Answers that failed their check, and transport failures.
    pub errors: u64,
    /// The first failure, to show what went wrong.
    pub first_error: Option<String>,
    /// From the first request to the last answer.
    pub elapsed: Duration,
    /// Whether the fixtures ran out before the deadline.
    pub exhausted: bool,
}

impl Measured {
    /// Requests per second over the run.
    pub fn rps(&self) -> f64 {
        let secs = self.elapsed.as_secs_f64();
        if secs == 0.0 {
            0.0
        } else {
            self.latencies_us.len() as f64 / secs
        }
    }

    /// The `q` quantile (0..=1) in milliseconds.
    pub fn quantile_ms(&self, q: f64) -> f64 {
        if self.latencies_us.is_empty() {
            return 0.0;
        }
        let last = self.latencies_us.len() - 1;
        let index = ((last as f64) * q).round() as usize;
        f64::from(self.latencies_us.get(index.min(last)).copied().unwrap_or(0)) / 1000.0
    }
}

struct ConnectionResult {
    latencies_us: Vec<u32>,
    errors: u64,
    first_error: Option<String>,
    exhausted: bool,
}

async fn connect(addr: SocketAddr) -> Result<http1::SendRequest<Full<Bytes>>, String> {
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    stream.set_nodelay(true).map_err(|e| e.to_string())?;
    let (sender, connection) = http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(sender)
}

async fn one_connection(
    addr: SocketAddr,
    fixtures: Arc<Fixtures>,
    deadline: Instant,
    pause: Duration,
) -> ConnectionResult {
    let mut result = ConnectionResult {
        latencies_us: Vec::with_capacity(4096),
        errors: 0,
        first_error: None,
        exhausted: false,
    };
    let fail = |result: &mut ConnectionResult, why: String| {
        result.errors += 1;
        if result.first_error.is_none() {
            result.first_error = Some(why);
        }
    };
    let mut sender = None;
    while Instant::now() < deadline {
        let Some(request) = fixtures.next_request(addr) else {
            result.exhausted = true;
            break;
        };
        if sender.is_none() {
            match connect(addr).await {
                Ok(s) => sender = Some(s),
                Err(e) => {
                    fail(&mut result, e);
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            }
        }
        let Some(s) = sender.as_mut() else { continue };
        let started = Instant::now();
        let answer = match s.send_request(request.http).await {
            Ok(response) => {
                let status = response.status().as_u16();
                match response.into_body().collect().await {
                    Ok(body) => Ok((status, body.to_bytes())),
                    Err(e) => Err(format!("body: {e}")),
                }
            }
            Err(e) => Err(format!("request: {e}")),
        };
        let took = started.elapsed();
        match answer {
            Ok((status, body)) => {
                result
                    .latencies_us
                    .push(u32::try_from(took.as_micros()).unwrap_or(u32::MAX));
                if let Err(why) = fixtures.check(&request.expect, status, &body) {
                    fail(&mut result, why);
                }
            }
            Err(why) => {
                fail(&mut result, why);
                sender = None;
            }
        }
        if !pause.is_zero() {
            tokio::time::sleep(pause).await;
        }
    }
    result
}

/// Runs `connections` connections against `addr` for `duration`, each waiting `pause` after
/// every answer (zero: as fast as the server answers; more: a steady trickle beside a load).
pub async fn drive(
    addr: SocketAddr,
    connections: usize,
    duration: Duration,
    pause: Duration,
    fixtures: Arc<Fixtures>,
) -> Measured {
    let started = Instant::now();
    let deadline = started + duration;
    let tasks: Vec<_> = (0..connections)
        .map(|_| tokio::spawn(one_connection(addr, Arc::clone(&fixtures), deadline, pause)))
        .collect();
    let mut measured = Measured::default();
    for task in tasks {
        match task.await {
            Ok(r) => {
                measured.latencies_us.extend(r.latencies_us);
                measured.errors += r.errors;
                measured.exhausted |= r.exhausted;
                if measured.first_error.is_none() {
                    measured.first_error = r.first_error;
                }
            }
            Err(e) => {
                measured.errors += 1;
                measured.first_error.get_or_insert(format!("task: {e}"));
            }
        }
    }
    measured.elapsed = started.elapsed();
    measured.latencies_us.sort_unstable();
    measured
}
