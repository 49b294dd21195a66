//! What all connections may take together, so that clients (authenticated or not)
//! cannot exhaust the daemon's memory or file descriptors: a cap on open connections
//! in total and per peer address, and a budget for the bytes every connection holds
//! in lines it has not finished sending.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

pub struct ConnectionBudget {
    max_total: usize,
    max_per_peer: usize,
    buffer_bytes: usize,
    open: AtomicUsize,
    per_peer: Mutex<HashMap<IpAddr, usize>>,
    buffered: AtomicUsize,
}

/// Why a new connection is refused; the message is written to the client.
#[derive(Debug, Clone, PartialEq)]
pub struct Refused(pub String);

impl ConnectionBudget {
    pub fn new(max_total: usize, max_per_peer: usize, buffer_bytes: usize) -> Arc<ConnectionBudget> {
        Arc::new(ConnectionBudget {
            max_total,
            max_per_peer,
            buffer_bytes,
            open: AtomicUsize::new(0),
            per_peer: Mutex::new(HashMap::new()),
            buffered: AtomicUsize::new(0),
        })
    }

    /// A place for a new connection from `peer` (none for a Unix socket: every
    /// client there is local), held until the connection ends.
    pub fn admit(self: &Arc<Self>, peer: Option<IpAddr>) -> Result<Slot, Refused> {
        if self.open.fetch_add(1, Ordering::AcqRel) >= self.max_total {
            self.open.fetch_sub(1, Ordering::AcqRel);
            return Err(Refused(format!(
                "the daemon has {} connections open, its limit (ingest.max_connections); try again later",
                self.max_total
            )));
        }
        if let Some(ip) = peer {
            let mut per_peer = self.per_peer.lock().unwrap_or_else(|p| p.into_inner());
            let n = per_peer.entry(ip).or_insert(0);
            if *n >= self.max_per_peer {
                drop(per_peer);
                self.open.fetch_sub(1, Ordering::AcqRel);
                return Err(Refused(format!(
                    "{ip} has {} connections open, the limit per address (ingest.max_connections_per_peer)",
                    self.max_per_peer
                )));
            }
            *n += 1;
        }
        Ok(Slot { budget: self.clone(), peer, held: 0 })
    }

    pub fn buffer_bytes(&self) -> usize {
        self.buffer_bytes
    }

    /// Bytes held in unfinished lines by all connections now.
    pub fn buffered(&self) -> usize {
        self.buffered.load(Ordering::Acquire)
    }
}

/// One connection's place, and its share of the buffer budget; both are given back
/// when it is dropped.
pub struct Slot {
    budget: Arc<ConnectionBudget>,
    peer: Option<IpAddr>,
    held: usize,
}

impl Slot {
    /// Records that this connection now holds `bytes` of an unfinished line. False
    /// when that takes all connections together over the budget (the bytes are
    /// counted all the same, until the connection drops them or closes).
    pub fn hold(&mut self, bytes: usize) -> bool {
        let total = if bytes >= self.held {
            self.budget.buffered.fetch_add(bytes - self.held, Ordering::AcqRel) + (bytes - self.held)
        } else {
            self.budget.buffered.fetch_sub(self.held - bytes, Ordering::AcqRel) - (self.held - bytes)
        };
        self.held = bytes;
        bytes == 0 || total <= self.budget.buffer_bytes
    }

}

impl Drop for Slot {
    fn drop(&mut self) {
        self.hold(0);
        self.budget.open.fetch_sub(1, Ordering::AcqRel);
        if let Some(ip) = self.peer {
            let mut per_peer = self.budget.per_peer.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(n) = per_peer.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    per_peer.remove(&ip);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_are_capped_in_total_and_per_address_and_given_back() {
        let budget = ConnectionBudget::new(3, 2, 100);
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let a1 = budget.admit(Some(a)).unwrap();
        let _a2 = budget.admit(Some(a)).unwrap();
        let refused = budget.admit(Some(a)).err().unwrap();
        assert!(refused.0.contains("10.0.0.1 has 2 connections open"), "{refused:?}");
        let _b1 = budget.admit(Some(b)).unwrap();
        let refused = budget.admit(None).err().unwrap();
        assert!(refused.0.contains("3 connections open"), "{refused:?}");
        drop(a1);
        let _a3 = budget.admit(Some(a)).unwrap();
    }

    #[test]
    fn unfinished_lines_share_one_budget() {
        let budget = ConnectionBudget::new(10, 10, 100);
        let (mut x, mut y) = (budget.admit(None).unwrap(), budget.admit(None).unwrap());
        assert!(x.hold(60));
        assert!(!y.hold(50), "110 bytes are over 100");
        assert!(y.hold(40));
        assert_eq!(budget.buffered(), 100);
        drop(x);
        assert_eq!(budget.buffered(), 40);
        assert!(y.hold(0));
        assert_eq!(budget.buffered(), 0);
    }
}
