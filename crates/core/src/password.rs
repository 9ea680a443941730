//! Password hashing with argon2id at OWASP's parameters (m=19456 KiB, t=2, p=1). Hashing runs on
//! a pool of its own, one thread per core, never on the async workers, and unknown users cost a
//! dummy verification so that their answers take as long as a wrong password's.

use std::cell::RefCell;
use std::sync::{Arc, Mutex, mpsc};

use argon2::password_hash::phc::{Output, Salt};
use argon2::{Algorithm, Argon2, Block, Params, PasswordHash, PasswordHasher as _, Version};
use secrecy::{ExposeSecret, SecretString};
use subtle::ConstantTimeEq;
use tokio::sync::oneshot;

use crate::error::CoreError;

/// The stored "hash" of accounts that have no password (created by phone verification): not a
/// PHC string, so no password ever matches it.
pub const NO_PASSWORD: &str = "!no-password";

/// Longest password accepted (argon2 takes any length; this bounds the work per request).
pub const MAX_PASSWORD_BYTES: usize = 1024;

/// Fewest characters a new password may have (NIST SP 800-63B §5.1.1.2).
pub const MIN_PASSWORD_CHARS: usize = 8;

/// Passwords too common to allow, lowercased, one a line; shipped with the binary.
const COMMON_PASSWORDS: &str = include_str!("common_passwords.txt");

/// The form a password is hashed and compared in: Unicode NFKC, so the same password typed on
/// another keyboard or platform (composed or decomposed, full-width digits) is the same bytes.
pub fn normalize(password: &SecretString) -> SecretString {
    use unicode_normalization::UnicodeNormalization;
    SecretString::from(password.expose_secret().nfkc().collect::<String>())
}

/// Checks a new password against the policy: long enough, not too long, not a common one. The
/// error says which rule failed. (Every length up to 1024 bytes is allowed and nothing is cut.)
pub fn check_new_password(password: &SecretString) -> Result<(), CoreError> {
    let normalized = normalize(password);
    let text = normalized.expose_secret();
    if text.chars().count() < MIN_PASSWORD_CHARS {
        return Err(CoreError::invalid(
            "password",
            format!("must be at least {MIN_PASSWORD_CHARS} characters"),
        ));
    }
    if text.len() > MAX_PASSWORD_BYTES {
        return Err(CoreError::invalid(
            "password",
            "is too long (at most 1024 bytes)",
        ));
    }
    let lowered = text.to_lowercase();
    if COMMON_PASSWORDS
        .lines()
        .any(|common| common.trim() == lowered)
    {
        return Err(CoreError::invalid(
            "password",
            "is one of the most common passwords; choose another",
        ));
    }
    Ok(())
}

type HashJob = Box<dyn FnOnce() + Send>;

/// One thread per core that runs argon2 jobs in arrival order. Each run takes ~20 ms of a core
/// and 19 MiB: on the shared blocking pool a burst of logins would start a thread each, starve
/// the async workers of CPU, and leave 19 MiB in each thread's allocator arena. Here at most one
/// run per core happens at once, the rest wait in the queue without a thread, and the memory
/// stays at one buffer per core.
struct HashPool {
    jobs: Mutex<mpsc::Sender<HashJob>>,
}

impl HashPool {
    fn start() -> Result<Self, CoreError> {
        let (tx, rx) = mpsc::channel::<HashJob>();
        let rx = Arc::new(Mutex::new(rx));
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        for i in 0..threads {
            let rx = Arc::clone(&rx);
            std::thread::Builder::new()
                .name(format!("otpgate-argon2-{i}"))
                .spawn(move || {
                    loop {
                        // The lock is held only while taking a job, not while running it.
                        let job = match rx.lock() {
                            Ok(rx) => rx.recv(),
                            Err(_) => return,
                        };
                        match job {
                            Ok(job) => job(),
                            Err(_) => return, // every hasher is gone
                        }
                    }
                })
                .map_err(|e| CoreError::Internal(format!("argon2 thread: {e}")))?;
        }
        Ok(HashPool {
            jobs: Mutex::new(tx),
        })
    }

    async fn run<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, CoreError> {
        let (tx, rx) = oneshot::channel();
        let job: HashJob = Box::new(move || {
            let _ = tx.send(work());
        });
        self.jobs
            .lock()
            .map_err(|_| CoreError::Internal("password hashing stopped".into()))?
            .send(job)
            .map_err(|_| CoreError::Internal("password hashing stopped".into()))?;
        rx.await
            .map_err(|_| CoreError::Internal("password hashing stopped".into()))
    }
}

/// Hashes and verifies passwords on a bounded pool, one run per core at a time.
#[derive(Clone)]
pub struct PasswordHasher {
    params: Params,
    dummy_hash: Arc<String>,
    pool: Arc<HashPool>,
}

impl std::fmt::Debug for PasswordHasher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PasswordHasher").finish_non_exhaustive()
    }
}

fn argon2(params: &Params) -> Argon2<'static> {
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params.clone())
}

fn hash_blocking(params: &Params, password: &[u8]) -> Result<String, CoreError> {
    argon2(params)
        .hash_password(password)
        .map(|h| h.to_string())
        .map_err(|e| CoreError::Internal(format!("argon2 hashing failed: {e}")))
}

thread_local! {
    /// argon2's working memory (19 MiB at our parameters), allocated once per hashing thread
    /// and reused by every run on it, instead of allocated and freed per login.
    static ARGON2_MEMORY: RefCell<Vec<Block>> = const { RefCell::new(Vec::new()) };
}

/// Runs `work` with this thread's argon2 memory, grown to `blocks` blocks.
fn with_argon2_memory<T>(blocks: usize, work: impl FnOnce(&mut [Block]) -> T) -> Option<T> {
    ARGON2_MEMORY.with(|memory| {
        let mut memory = memory.try_borrow_mut().ok()?;
        if memory.len() < blocks {
            memory.resize(blocks, Block::default());
        }
        memory.get_mut(..blocks).map(work)
    })
}

/// Hashes a new password into a PHC string, in this thread's reused memory.
fn hash_in_place(params: &Params, password: &[u8]) -> Result<String, CoreError> {
    let failed =
        |e: &dyn std::fmt::Display| CoreError::Internal(format!("argon2 hashing failed: {e}"));
    let salt: [u8; 16] = crate::crypto::random_bytes()?;
    let mut out = [0u8; 32];
    with_argon2_memory(params.block_count(), |blocks| {
        argon2(params).hash_password_into_with_memory(password, &salt, &mut out, blocks)
    })
    .ok_or_else(|| failed(&"argon2 memory busy"))?
    .map_err(|e| failed(&e))?;
    let phc = PasswordHash {
        algorithm: Algorithm::Argon2id.ident(),
        version: Some(Version::V0x13.into()),
        params: params.try_into().map_err(|e| failed(&e))?,
        salt: Some(Salt::new(&salt).map_err(|e| failed(&e))?),
        hash: Some(Output::new(&out).map_err(|e| failed(&e))?),
    };
    Ok(phc.to_string())
}

/// Whether `password` matches the PHC string `phc`, computed in this thread's reused memory.
/// Anything that is not an argon2 PHC string matches nothing.
fn verify_in_place(phc: &PasswordHash, password: &[u8]) -> bool {
    let (Some(salt), Some(expected)) = (&phc.salt, &phc.hash) else {
        return false;
    };
    let Ok(params) = Params::try_from(phc) else {
        return false;
    };
    let Ok(algorithm) = Algorithm::try_from(phc.algorithm.as_str()) else {
        return false;
    };
    let version = match phc.version.map(Version::try_from) {
        None => Version::default(),
        Some(Ok(v)) => v,
        Some(Err(_)) => return false,
    };
    let mut out = vec![0u8; expected.len()];
    let argon = Argon2::new(algorithm, version, params.clone());
    let computed = with_argon2_memory(params.block_count(), |blocks| {
        argon.hash_password_into_with_memory(password, salt, &mut out, blocks)
    });
    matches!(computed, Some(Ok(()))) && bool::from(out.ct_eq(expected.as_bytes()))
}

impl PasswordHasher {
    /// OWASP's argon2id parameters; computes the dummy hash once.
    pub fn owasp() -> Result<Self, CoreError> {
        let params = Params::new(19_456, 2, 1, None)
            .map_err(|e| CoreError::Internal(format!("argon2 params: {e}")))?;
        Self::with_params(params)
    }

    /// Custom parameters (tests of other crates may use cheaper ones; production uses OWASP's).
    pub fn with_params(params: Params) -> Result<Self, CoreError> {
        let dummy = hash_blocking(&params, b"otpgate dummy password")?;
        Ok(PasswordHasher {
            params,
            dummy_hash: Arc::new(dummy),
            pool: Arc::new(HashPool::start()?),
        })
    }

    /// Refuses empty and oversized passwords.
    pub fn check_acceptable(password: &SecretString) -> Result<(), CoreError> {
        let len = password.expose_secret().len();
        if len == 0 {
            return Err(CoreError::invalid("password", "is required"));
        }
        if len > MAX_PASSWORD_BYTES {
            return Err(CoreError::invalid("password", "is too long"));
        }
        Ok(())
    }

    /// Hashes a password (NFKC-normalised) into a PHC string, off the async workers.
    pub async fn hash(&self, password: SecretString) -> Result<String, CoreError> {
        Self::check_acceptable(&password)?;
        let password = normalize(&password);
        let params = self.params.clone();
        let span = tracing::Span::current();
        self.pool
            .run(move || {
                let _entered = span.enter();
                hash_in_place(&params, password.expose_secret().as_bytes())
            })
            .await?
    }

    /// Verifies `password` against `stored`, or against the dummy hash when there is no user,
    /// so both cases cost one argon2 run. Oversized passwords are not hashed at all.
    pub async fn verify(
        &self,
        password: SecretString,
        stored: Option<String>,
    ) -> Result<bool, CoreError> {
        let real = stored.is_some();
        let phc = stored.unwrap_or_else(|| self.dummy_hash.as_ref().clone());
        let dummy = Arc::clone(&self.dummy_hash);
        let acceptable = Self::check_acceptable(&password).is_ok();
        let password = normalize(&password);
        let span = tracing::Span::current();
        let matched = self.pool.run(move || {
            let _entered = span.enter();
            let candidate: &[u8] = if acceptable {
                password.expose_secret().as_bytes()
            } else {
                b"\0"
            };
            match PasswordHash::new(&phc) {
                Ok(parsed) => verify_in_place(&parsed, candidate),
                // An account without a password (created by phone verification) costs the
                // same argon2 run as any other, and never matches.
                Err(_) => {
                    if let Ok(parsed) = PasswordHash::new(dummy.as_str()) {
                        let _ = verify_in_place(&parsed, candidate);
                    }
                    false
                }
            }
        });
        // Awaited whatever `real` is: an unknown user must cost the same argon2 run.
        let matched = matched.await?;
        Ok(real && acceptable && matched)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_in_reused_memory_are_standard_phc_strings_both_ways() {
        use argon2::PasswordVerifier as _;
        let params = Params::new(19_456, 2, 1, None).unwrap();
        let ours = hash_in_place(&params, b"correct horse").unwrap();
        let parsed = PasswordHash::new(&ours).unwrap();
        assert!(
            argon2(&params)
                .verify_password(b"correct horse", &parsed)
                .is_ok()
        );
        assert!(verify_in_place(&parsed, b"correct horse"));
        assert!(!verify_in_place(&parsed, b"correct horsf"));
        let theirs = hash_blocking(&params, b"battery staple").unwrap();
        let parsed = PasswordHash::new(&theirs).unwrap();
        assert!(verify_in_place(&parsed, b"battery staple"));
        assert!(!verify_in_place(&parsed, b"battery stapler"));
        // The memory was allocated once for this thread and reused.
        ARGON2_MEMORY.with(|m| assert_eq!(m.borrow().len(), params.block_count()));
    }

    #[tokio::test]
    async fn a_hash_verifies_its_password_only() {
        let hasher = PasswordHasher::owasp().unwrap();
        let hash = hasher
            .hash(SecretString::from("correct horse"))
            .await
            .unwrap();
        assert!(hash.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"));
        assert!(
            hasher
                .verify(SecretString::from("correct horse"), Some(hash.clone()))
                .await
                .unwrap()
        );
        assert!(
            !hasher
                .verify(SecretString::from("wrong"), Some(hash))
                .await
                .unwrap()
        );
    }

    #[test]
    fn the_password_policy_names_the_rule_that_failed() {
        let reason = |p: &str| match check_new_password(&SecretString::from(p.to_owned())) {
            Err(CoreError::InvalidInput { reason, .. }) => reason,
            Err(other) => other.to_string(),
            Ok(()) => "ok".into(),
        };
        assert_eq!(reason("short1!"), "must be at least 8 characters");
        assert!(reason("Password1").contains("common"));
        assert!(reason("QWERTY123").contains("common"));
        assert_eq!(
            reason(&"x".repeat(1025)),
            "is too long (at most 1024 bytes)"
        );
        assert_eq!(reason("correct horse battery staple"), "ok");
        assert_eq!(
            reason(&"long passphrase ".repeat(8)),
            "ok",
            "64+ characters are allowed"
        );
    }

    #[tokio::test]
    async fn composed_and_decomposed_forms_are_the_same_password() {
        let hasher = PasswordHasher::owasp().unwrap();
        let hash = hasher
            .hash(SecretString::from("caf\u{e9} au lait"))
            .await
            .unwrap();
        let decomposed = SecretString::from("cafe\u{301} au lait");
        assert!(hasher.verify(decomposed, Some(hash)).await.unwrap());
    }

    #[tokio::test]
    async fn an_account_without_a_password_never_verifies() {
        let hasher = PasswordHasher::owasp().unwrap();
        let none = Some(NO_PASSWORD.to_owned());
        assert!(
            !hasher
                .verify(SecretString::from("anything"), none)
                .await
                .unwrap()
        );
    }

    #[tokio::test]
    async fn no_user_never_verifies_even_with_the_dummy_password() {
        let hasher = PasswordHasher::owasp().unwrap();
        assert!(
            !hasher
                .verify(SecretString::from("otpgate dummy password"), None)
                .await
                .unwrap()
        );
    }
}
