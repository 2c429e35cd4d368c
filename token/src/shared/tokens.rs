//! One provider's token in Redis: the record (sealed with the provider's store key, or plain
//! JSON when the config allows it), the refresh lock with its lease, the compare-and-set commit
//! that moves the generation forward and publishes, and the loop that turns
//! [`decide`](super::decide::decide) into Redis calls.

use std::sync::{Arc, LazyLock};
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use rand::Rng as _;
use redis::Script;
use tokio::time::Instant;

use super::backend::{SharedBackend, SharedError};
use super::decide::{decide, Action, Lock, View};
use crate::store::{Record, Store};

/// A shared value is a few hundred bytes; anything larger is not ours and is not read.
const MAX_VALUE: usize = 64 * 1024;
/// Generations are compared in Lua, whose numbers are exact up to 2^53: longer digit runs
/// mark a damaged value.
const MAX_GENERATION_DIGITS: usize = 15;
const MAGIC: &str = "tsk1";

/// Reads the value if it is a string of a sane size; anything else reads as damaged.
static READ: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local t = redis.call('TYPE', KEYS[1])['ok']
if t == 'none' then return false end
if t ~= 'string' then return 'damaged' end
if redis.call('STRLEN', KEYS[1]) > tonumber(ARGV[1]) then return 'damaged' end
return redis.call('GET', KEYS[1])
",
    )
});

/// SET NX PX, after removing a value that cannot be a live lease (another type, or no expiry:
/// a foreign key would otherwise block every refresh for ever).
static TAKE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local t = redis.call('TYPE', KEYS[1])['ok']
if t ~= 'none' and (t ~= 'string' or redis.call('PTTL', KEYS[1]) < 0) then
  redis.call('DEL', KEYS[1])
end
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
return 0
",
    )
});

/// Extends the lease only while it is still ours (compare value, then PEXPIRE).
static RENEW: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('TYPE', KEYS[1])['ok'] == 'string' and redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
",
    )
});

/// Gives the lock back if it is still ours.
static RELEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('TYPE', KEYS[1])['ok'] == 'string' and redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
",
    )
});

/// Compare-and-set: writes the new record only if the stored one still has the generation the
/// caller started from and the new generation is higher; then releases the caller's lock and
/// publishes. Returns -1 on success, else the generation found.
static COMMIT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local cur = 0
if redis.call('TYPE', KEYS[1])['ok'] == 'string' then
  local g = string.match(redis.call('GET', KEYS[1]), '^tsk1:(%d+):')
  if g and #g <= 15 then cur = tonumber(g) end
end
if cur ~= tonumber(ARGV[1]) or tonumber(ARGV[2]) <= cur then return cur end
redis.call('SET', KEYS[1], ARGV[3])
if redis.call('TYPE', KEYS[2])['ok'] == 'string' and redis.call('GET', KEYS[2]) == ARGV[4] then
  redis.call('DEL', KEYS[2])
end
redis.call('PUBLISH', ARGV[5], ARGV[6])
return -1
",
    )
});

/// One provider's shared token state.
pub(crate) struct SharedTokens {
    backend: SharedBackend,
    provider: String,
    token_key: String,
    lock_key: String,
    /// Seals and opens records with the provider's store key; `None`: plain text (allowed by
    /// `shared.redis.plaintext_tokens`).
    sealer: Option<Store>,
    /// Longest wait for another replica's refresh (`replay.wait_for_token`).
    wait: Duration,
}

/// What the shared layer decided for one refresh.
pub(crate) enum Outcome {
    /// Another replica's token, to be used as is.
    Adopt(Record),
    /// Call the identity provider. With a lease: commit through it afterwards. `record`: the
    /// shared record whose refresh token is to be spent.
    Call {
        lease: Option<Lease>,
        record: Option<Record>,
        floor: u64,
    },
    /// No identity-provider call (fail_closed, or another replica's refresh did not land).
    Refuse(String),
}

/// The refresh lock while this replica holds it: renewed in the background until dropped.
pub(crate) struct Lease {
    shared: Arc<SharedTokens>,
    me: String,
    expect: u64,
    renewer: tokio::task::AbortHandle,
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.renewer.abort();
    }
}

/// How a commit went.
pub(crate) enum Commit {
    Done,
    /// Another replica committed generation `.0` meanwhile (the lease was lost).
    Conflict(u64),
    Failed(SharedError),
}

impl SharedTokens {
    pub(crate) fn new(
        backend: SharedBackend,
        provider: &str,
        store_key: Option<&str>,
        wait: Duration,
    ) -> SharedTokens {
        let token_key = backend.key(&["token", provider]);
        let lock_key = backend.key(&["lock", provider]);
        let sealer = store_key.map(|k| Store::new(format!("redis key {token_key}"), k, provider));
        SharedTokens {
            backend,
            provider: provider.to_string(),
            token_key,
            lock_key,
            sealer,
            wait,
        }
    }

    pub(crate) fn backend(&self) -> &SharedBackend {
        &self.backend
    }

    /// The value a record is stored as: `tsk1:<generation>:<e|p>:<base64>`.
    pub(crate) fn encode(&self, record: &Record) -> Option<String> {
        let b64 = base64::engine::general_purpose::STANDARD;
        let (kind, bytes) = match &self.sealer {
            Some(store) => ("e", store.seal(record).ok()?),
            None => ("p", serde_json::to_vec(record).ok()?),
        };
        Some(format!(
            "{MAGIC}:{}:{kind}:{}",
            record.generation,
            b64.encode(bytes)
        ))
    }

    /// Reads a stored value back. Never fails: what cannot be used is `Damaged`.
    pub(crate) fn parse(&self, value: &[u8]) -> (View, Option<Record>) {
        let damaged = |generation| (View::Damaged { generation }, None);
        let Ok(text) = std::str::from_utf8(value) else {
            return damaged(0);
        };
        let mut parts = text.splitn(4, ':');
        if parts.next() != Some(MAGIC) {
            return damaged(0);
        }
        let generation = match parts.next() {
            Some(g)
                if !g.is_empty()
                    && g.len() <= MAX_GENERATION_DIGITS
                    && g.bytes().all(|b| b.is_ascii_digit()) =>
            {
                g.parse::<u64>().unwrap_or(0)
            }
            _ => return damaged(0),
        };
        let (Some(kind), Some(body)) = (parts.next(), parts.next()) else {
            return damaged(generation);
        };
        let Ok(bytes) = base64::engine::general_purpose::STANDARD.decode(body) else {
            return damaged(generation);
        };
        let record = match (kind, &self.sealer) {
            ("e", Some(store)) => store.open(&bytes).ok(),
            ("p", None) => serde_json::from_slice::<Record>(&bytes).ok(),
            // Sealed when we expect plain text or the other way round: not ours to use.
            _ => None,
        };
        match record {
            Some(r) if r.generation == generation && !r.access_token.is_empty() => {
                let usable = r.ttl_left(SystemTime::now()) > Duration::ZERO;
                (View::Valid { generation, usable }, Some(r))
            }
            _ => damaged(generation),
        }
    }

    async fn read(&self) -> Result<(View, Option<Record>), SharedError> {
        let key = self.token_key.clone();
        let value: Option<Vec<u8>> = self
            .backend
            .call("read", |mut c| async move {
                READ.key(key).arg(MAX_VALUE).invoke_async(&mut c).await
            })
            .await?;
        Ok(match value {
            None => (View::Absent, None),
            Some(v) => {
                let (view, record) = self.parse(&v);
                if matches!(view, View::Damaged { .. }) {
                    tracing::warn!(provider = %self.provider, key = %self.token_key, "the shared token value is damaged or not ours; ignoring it (the next refresh overwrites it)");
                }
                (view, record)
            }
        })
    }

    async fn take(&self, me: &str) -> Result<bool, SharedError> {
        let (key, me, lease) = (
            self.lock_key.clone(),
            me.to_string(),
            self.backend.lease().as_millis() as u64,
        );
        let got: i64 = self
            .backend
            .call("lock", |mut c| async move {
                TAKE.key(key).arg(me).arg(lease).invoke_async(&mut c).await
            })
            .await?;
        Ok(got == 1)
    }

    async fn renew(&self, me: &str) -> Result<bool, SharedError> {
        let (key, me, lease) = (
            self.lock_key.clone(),
            me.to_string(),
            self.backend.lease().as_millis() as u64,
        );
        let kept: i64 = self
            .backend
            .call("renew", |mut c| async move {
                RENEW.key(key).arg(me).arg(lease).invoke_async(&mut c).await
            })
            .await?;
        Ok(kept == 1)
    }

    async fn release(&self, me: &str) {
        let (key, me) = (self.lock_key.clone(), me.to_string());
        let _ = self
            .backend
            .call("release", |mut c| async move {
                RELEASE.key(key).arg(me).invoke_async::<i64>(&mut c).await
            })
            .await;
    }

    /// Decides, and waits for another replica's refresh when that is the decision, for at
    /// most the configured wait. `local`: the generation this replica holds.
    pub(crate) async fn coordinate(self: &Arc<Self>, local: u64) -> Outcome {
        let deadline = Instant::now() + self.wait;
        let mode = self.backend.mode();
        let poll =
            (self.backend.lease() / 4).clamp(Duration::from_millis(20), Duration::from_secs(1));
        let mut publications = self.backend.publications();
        loop {
            publications.borrow_and_update();
            let read = self.read().await;
            let (view, record) = match &read {
                Ok((v, r)) => (Some(*v), r.clone()),
                Err(_) => (None, None),
            };
            let mut action = decide(local, view, Lock::NotTried, false, mode);
            let mut lease = None;
            let (mut view, mut record) = (view, record);
            if action == Action::TryLock {
                let me = lease_id();
                match self.take(&me).await {
                    Ok(true) => {
                        // Someone may have committed between the read and the lock.
                        match self.read().await {
                            Ok((v, r)) => {
                                view = Some(v);
                                record = r;
                                action = decide(local, view, Lock::Acquired, false, mode);
                            }
                            Err(_) => action = decide(local, None, Lock::Acquired, true, mode),
                        }
                        lease = Some(me);
                    }
                    Ok(false) => action = decide(local, view, Lock::HeldElsewhere, false, mode),
                    Err(_) => action = decide(local, view, Lock::NotTried, true, mode),
                }
            }
            match action {
                Action::Adopt => {
                    if let Some(me) = lease {
                        self.release(&me).await;
                    }
                    if let Some(r) = record {
                        return Outcome::Adopt(r);
                    }
                }
                Action::Call {
                    expect,
                    shared_refresh_token,
                } => {
                    let me = lease.unwrap_or_else(lease_id);
                    return Outcome::Call {
                        lease: Some(self.hold(me, expect)),
                        record: record.filter(|_| shared_refresh_token),
                        floor: view.map_or(0, View::generation),
                    };
                }
                Action::Alone => {
                    if let Some(me) = lease {
                        self.release(&me).await;
                    }
                    tracing::warn!(provider = %self.provider, "shared redis is down; refreshing alone (on_redis_down: local)");
                    return Outcome::Call {
                        lease: None,
                        record: None,
                        floor: 0,
                    };
                }
                Action::Refuse => {
                    if let Some(me) = lease {
                        self.release(&me).await;
                    }
                    return Outcome::Refuse(
                        "redis is down and on_redis_down is fail_closed: no identity-provider call until it is back".into(),
                    );
                }
                Action::Wait | Action::TryLock => {}
            }
            // Wait for a publication, or poll: the holder's lease may run out (a dead holder).
            let now = Instant::now();
            if now >= deadline {
                return Outcome::Refuse(format!(
                    "another replica's refresh did not land within {}",
                    humantime::format_duration(self.wait)
                ));
            }
            let until = (now + poll).min(deadline);
            tokio::select! {
                _ = publications.changed() => {}
                _ = tokio::time::sleep_until(until) => {}
            }
        }
    }

    /// Starts renewing the lease `me` every third of it while the identity-provider call runs.
    fn hold(self: &Arc<Self>, me: String, expect: u64) -> Lease {
        let shared = self.clone();
        let id = me.clone();
        let every = self.backend.lease() / 3;
        let renewer = tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                match shared.renew(&id).await {
                    Ok(true) => {}
                    Ok(false) => {
                        tracing::warn!(provider = %shared.provider, "the refresh lock was lost while the identity-provider call ran; the commit will tell whether another replica refreshed");
                        return;
                    }
                    Err(_) => {}
                }
            }
        });
        Lease {
            shared: self.clone(),
            me,
            expect,
            renewer: renewer.abort_handle(),
        }
    }
}

impl Lease {
    /// Commits the new record (compare-and-set on the generation this refresh started from),
    /// releases the lock and publishes.
    pub(crate) async fn commit(self, record: &Record) -> Commit {
        let shared = self.shared.clone();
        let Some(value) = shared.encode(record) else {
            self.release().await;
            return Commit::Failed(SharedError::Refused("cannot seal the record".into()));
        };
        let keys = (shared.token_key.clone(), shared.lock_key.clone());
        let args = (
            self.expect,
            record.generation,
            value,
            self.me.clone(),
            shared.backend.channel(),
            format!("{} {}", record.generation, shared.provider),
        );
        let result: Result<i64, _> = shared
            .backend
            .call("commit", |mut c| async move {
                COMMIT
                    .key(keys.0)
                    .key(keys.1)
                    .arg(args.0)
                    .arg(args.1)
                    .arg(args.2)
                    .arg(args.3)
                    .arg(args.4)
                    .arg(args.5)
                    .invoke_async(&mut c)
                    .await
            })
            .await;
        match result {
            Ok(-1) => Commit::Done,
            Ok(found) => {
                self.release().await;
                Commit::Conflict(u64::try_from(found).unwrap_or(0))
            }
            Err(e) => Commit::Failed(e),
        }
    }

    /// Gives the lock back without committing (the identity-provider call failed).
    pub(crate) async fn release(self) {
        self.renewer.abort();
        self.shared.release(&self.me).await;
    }
}

/// A lease value no other replica (or attempt) uses.
fn lease_id() -> String {
    let n: u64 = rand::rng().random();
    format!("{}-{n:016x}", std::process::id())
}

#[cfg(test)]
mod tests;
