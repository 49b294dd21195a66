//! Which open connections each API key authenticated, so that a key that stops opening
//! anything (revoked, or rotated and past its grace period) loses them within a second,
//! on every daemon: the revocation or rotation is announced with NOTIFY (`botflow_keys`),
//! the daemon checks the key's standing in the database, and each of its connections
//! gets an `unauthenticated` error line and is closed. A rotated key in its grace period
//! is checked again when the grace ends.

use crate::store::keys::{self, Standing};
use crate::store::Store;
use actix::prelude::*;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use uuid::Uuid;

/// Sent to a connection whose key no longer opens anything; the text says why.
#[derive(Message)]
#[rtype(result = "()")]
pub struct KeyWithdrawn(pub &'static str);

const REVOKED: &str = "the key was revoked";
const EXPIRED: &str = "the key expired: it was rotated and its grace period ended";

#[derive(Default)]
struct Inner {
    by_key: HashMap<Uuid, HashMap<u64, Recipient<KeyWithdrawn>>>,
    /// Keys found withdrawn since this daemon started (it never changes back), so a
    /// connection whose hello was checked just before the withdrawal was heard is
    /// closed when it registers.
    withdrawn: HashMap<Uuid, &'static str>,
}

#[derive(Default)]
pub struct Sessions {
    inner: Mutex<Inner>,
}

impl Sessions {
    pub fn new() -> Arc<Sessions> {
        Arc::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers connection `conn` of `key`; `Err` with the reason when the key is
    /// already known to be withdrawn (the connection must close).
    pub fn add(&self, key: Uuid, conn: u64, recipient: Recipient<KeyWithdrawn>) -> Result<(), &'static str> {
        let mut inner = self.lock();
        if let Some(why) = inner.withdrawn.get(&key) {
            return Err(why);
        }
        inner.by_key.entry(key).or_default().insert(conn, recipient);
        Ok(())
    }

    pub fn remove(&self, key: Uuid, conn: u64) {
        let mut inner = self.lock();
        if let Some(conns) = inner.by_key.get_mut(&key) {
            conns.remove(&conn);
            if conns.is_empty() {
                inner.by_key.remove(&key);
            }
        }
    }

    fn withdraw(&self, key: Uuid, why: &'static str) {
        let conns = {
            let mut inner = self.lock();
            inner.withdrawn.insert(key, why);
            inner.by_key.remove(&key).unwrap_or_default()
        };
        if !conns.is_empty() {
            tracing::info!(key_id = %key, connections = conns.len(), reason = why, "closing the connections of a withdrawn key");
        }
        for (_, r) in conns {
            r.do_send(KeyWithdrawn(why));
        }
    }

    /// Checks `key` in the database and closes its connections if it opens nothing any
    /// more; a key in its grace period is checked again when the grace ends.
    pub async fn check(self: Arc<Self>, store: Store, key: Uuid) {
        let mut attempts = 0;
        loop {
            match keys::standing(&store, key).await {
                Ok(Standing::Valid) => return,
                Ok(Standing::Revoked | Standing::Gone) => return self.withdraw(key, REVOKED),
                Ok(Standing::Expired) => return self.withdraw(key, EXPIRED),
                Ok(Standing::ExpiresIn(left)) => {
                    // Checked again just after the database's clock passes the expiry.
                    tokio::time::sleep(left + Duration::from_millis(20)).await;
                }
                Err(error) => {
                    attempts += 1;
                    tracing::warn!(%error, key_id = %key, "cannot check a key's standing; trying again");
                    if attempts > 30 {
                        return;
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }

    /// After the change listener reconnected (announcements may have been missed):
    /// checks every key that has open connections.
    pub fn check_all(self: &Arc<Self>, store: &Store) {
        let keys: Vec<Uuid> = self.lock().by_key.keys().copied().collect();
        for key in keys {
            actix_rt::spawn(self.clone().check(store.clone(), key));
        }
    }
}
