//! The master key's reach: loading the code-hash key sealed in the database, and rotating the
//! master key by re-sealing every secret under a new one in one transaction.
//!
//! Codes and recovery codes are stored as MACs under the code-hash key. That key lives in the
//! database sealed under the master key (not derived from it), so a new master key re-seals
//! it and every stored MAC keeps matching.

use crate::CoreError;
use crate::crypto::MasterKey;
use crate::service::CoreResult;
use crate::store::{SealedKind, Store};

/// Name of the sealed code-hash key in the server secrets.
const CODE_HASH_KEY: &str = "code-hash-key";

/// The code-hash key, created on first start. Earlier versions derived it from the master key;
/// the first value stored is that same derivation, so codes already stored keep matching.
pub(crate) async fn load_code_key(store: &dyn Store, master: &MasterKey) -> CoreResult<[u8; 32]> {
    let candidate = master.seal(&master.derive("code-hash"), CODE_HASH_KEY.as_bytes())?;
    let sealed = store
        .ensure_server_secret(CODE_HASH_KEY, &candidate)
        .await?;
    let key = master
        .open(&sealed, CODE_HASH_KEY.as_bytes())
        .map_err(|_| CoreError::WrongMasterKey)?;
    key.try_into()
        .map_err(|_| CoreError::Internal("the stored code-hash key is not 32 bytes".into()))
}

/// How many secrets a rotation re-sealed, by kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Resealed {
    /// TOTP factor secrets.
    pub totp_factors: usize,
    /// Tenants' JWT signing keys.
    pub jwt_keys: usize,
    /// Server secrets (the code-hash key).
    pub server_secrets: usize,
}

/// Re-seals every secret sealed under `old` under `new`, in one transaction. Nothing changes
/// unless every secret opens with `old` (`WrongMasterKey` otherwise) and none changed meanwhile.
pub async fn rotate_master_key(
    store: &dyn Store,
    old: &MasterKey,
    new: &MasterKey,
) -> CoreResult<Resealed> {
    // A database that never ran the server has no code-hash key yet: create it under `old`
    // first, so it moves with the rest.
    load_code_key(store, old).await?;
    let secrets = store.sealed_secrets().await?;
    let mut changes = Vec::with_capacity(secrets.len());
    let mut count = Resealed::default();
    for secret in secrets {
        let plain = old
            .open(&secret.sealed, secret.id.as_bytes())
            .map_err(|_| CoreError::WrongMasterKey)?;
        let resealed = new.seal(&plain, secret.id.as_bytes())?;
        match secret.kind {
            SealedKind::TotpFactor => count.totp_factors += 1,
            SealedKind::JwtKey => count.jwt_keys += 1,
            SealedKind::ServerSecret => count.server_secrets += 1,
        }
        changes.push((secret, resealed));
    }
    store.reseal_secrets(&changes).await?;
    Ok(count)
}
