//! Admission of incoming connections: how many may be in their TLS
//! handshake and how many established, in total and per source address,
//! with a reserve that only privileged callers (trusted peers; on
//! `admin_listen`, the operator's keys) can use.
//!
//! Counting happens before anything is spawned or allocated for a
//! connection, so a flood of connections that never speak costs a closed
//! socket each, not a file descriptor held for the handshake timeout.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::config::Limits;
use crate::crypto::NodeId;

/// The numbers a [`Gate`] enforces (from `[limits]`).
#[derive(Clone, Debug)]
pub(crate) struct ConnLimits {
    pub(crate) max_handshakes: usize,
    pub(crate) max_handshakes_per_address: usize,
    pub(crate) handshake_timeout: Duration,
    pub(crate) max_connections: usize,
    pub(crate) reserved_for_trusted: usize,
    pub(crate) max_connections_per_address: usize,
    pub(crate) idle_timeout: Duration,
}

impl ConnLimits {
    pub(crate) fn from_config(l: &Limits) -> ConnLimits {
        ConnLimits {
            max_handshakes: l.max_handshakes as usize,
            max_handshakes_per_address: l.max_handshakes_per_address as usize,
            handshake_timeout: Duration::from_secs(l.handshake_timeout_secs),
            max_connections: l.max_connections as usize,
            reserved_for_trusted: l.reserved_for_trusted as usize,
            max_connections_per_address: l.max_connections_per_address as usize,
            idle_timeout: Duration::from_secs(l.idle_timeout_secs),
        }
    }
}

/// Who may use the reserve: decided from the client certificate's node id.
pub(crate) type Privileged = Box<dyn Fn(&NodeId) -> bool + Send + Sync>;

#[derive(Default)]
struct Counts {
    handshakes: usize,
    handshakes_by_addr: HashMap<IpAddr, usize>,
    established: usize,
    /// Established connections of callers that are not privileged, by address.
    others_by_addr: HashMap<IpAddr, usize>,
    others: usize,
}

/// One listener's connection counts. Shared by the TCP listener and the
/// onion service of the same server (onion streams have no address: only
/// the totals apply to them).
pub(crate) struct Gate {
    pub(crate) limits: ConnLimits,
    privileged: Privileged,
    counts: Mutex<Counts>,
    refused: RateLog,
}

/// Held while a connection is in its handshake.
pub(crate) struct Handshake {
    gate: Arc<Gate>,
    addr: Option<IpAddr>,
}

/// Held for as long as an established connection lives.
pub(crate) struct Admitted {
    gate: Arc<Gate>,
    addr: Option<IpAddr>,
    privileged: bool,
}

fn dec(map: &mut HashMap<IpAddr, usize>, addr: Option<IpAddr>) {
    if let Some(a) = addr {
        if let Some(n) = map.get_mut(&a) {
            *n -= 1;
            if *n == 0 {
                map.remove(&a);
            }
        }
    }
}

impl Gate {
    pub(crate) fn new(limits: ConnLimits, privileged: Privileged) -> Arc<Gate> {
        Arc::new(Gate {
            limits,
            privileged,
            counts: Mutex::new(Counts::default()),
            refused: RateLog::new("refused connections over the limits ([limits] in config.toml)"),
        })
    }

    fn counts(&self) -> std::sync::MutexGuard<'_, Counts> {
        self.counts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A handshake slot for a new connection from `addr`, or `None` (close it).
    pub(crate) fn begin(self: &Arc<Self>, addr: Option<IpAddr>, remote: &str) -> Option<Handshake> {
        let mut c = self.counts();
        let from_addr = addr.map_or(0, |a| c.handshakes_by_addr.get(&a).copied().unwrap_or(0));
        if c.handshakes >= self.limits.max_handshakes {
            drop(c);
            self.refused.hit(|| {
                format!(
                    "{remote}: {} handshakes in progress",
                    self.limits.max_handshakes
                )
            });
            return None;
        }
        if from_addr >= self.limits.max_handshakes_per_address {
            drop(c);
            self.refused
                .hit(|| format!("{remote}: {from_addr} handshakes in progress from its address"));
            return None;
        }
        c.handshakes += 1;
        if let Some(a) = addr {
            *c.handshakes_by_addr.entry(a).or_insert(0) += 1;
        }
        Some(Handshake {
            gate: self.clone(),
            addr,
        })
    }

    /// Turn a finished handshake into an established connection of `node`
    /// (the client certificate's id, if any), or `None` (close it).
    pub(crate) fn admit(
        &self,
        hs: Handshake,
        node: Option<&NodeId>,
        remote: &str,
    ) -> Option<Admitted> {
        let privileged = node.is_some_and(|n| (self.privileged)(n));
        let addr = hs.addr;
        let gate = hs.gate.clone();
        drop(hs);
        let l = &self.limits;
        let mut c = self.counts();
        let from_addr = addr.map_or(0, |a| c.others_by_addr.get(&a).copied().unwrap_or(0));
        let why = if c.established >= l.max_connections {
            Some(format!("{} connections open", c.established))
        } else if !privileged && c.others >= l.max_connections - l.reserved_for_trusted {
            Some(format!(
                "{} connections of callers that are not trusted peers open (the other {} are reserved)",
                c.others, l.reserved_for_trusted
            ))
        } else if !privileged && from_addr >= l.max_connections_per_address {
            Some(format!("{from_addr} connections from its address"))
        } else {
            None
        };
        if let Some(why) = why {
            drop(c);
            self.refused.hit(|| format!("{remote}: {why}"));
            return None;
        }
        c.established += 1;
        if !privileged {
            c.others += 1;
            if let Some(a) = addr {
                *c.others_by_addr.entry(a).or_insert(0) += 1;
            }
        }
        Some(Admitted {
            gate,
            addr,
            privileged,
        })
    }
}

impl Drop for Handshake {
    fn drop(&mut self) {
        let mut c = self.gate.counts();
        c.handshakes -= 1;
        dec(&mut c.handshakes_by_addr, self.addr);
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut c = self.gate.counts();
        c.established -= 1;
        if !self.privileged {
            c.others -= 1;
            dec(&mut c.others_by_addr, self.addr);
        }
    }
}

/// A warning that may fire thousands of times a second under attack,
/// written at most once per [`RateLog::EVERY`]: the first event at once,
/// later ones counted into the next line.
pub(crate) struct RateLog {
    what: &'static str,
    state: Mutex<(Option<Instant>, u64)>,
}

impl RateLog {
    pub(crate) const EVERY: Duration = Duration::from_secs(10);

    pub(crate) const fn new(what: &'static str) -> RateLog {
        RateLog {
            what,
            state: Mutex::new((None, 0)),
        }
    }

    /// Count one event; log it (with how many were not logged) if the last
    /// line is old enough. `detail` is only built when a line is written.
    pub(crate) fn hit(&self, detail: impl FnOnce() -> String) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.1 += 1;
        if s.0.is_some_and(|t| t.elapsed() < Self::EVERY) {
            return;
        }
        let n = std::mem::take(&mut s.1);
        s.0 = Some(Instant::now());
        drop(s);
        tracing::warn!(
            "{}: {n} in the last {}s, latest {}",
            self.what,
            Self::EVERY.as_secs(),
            detail()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gate(privileged: bool) -> Arc<Gate> {
        let l = ConnLimits {
            max_handshakes: 3,
            max_handshakes_per_address: 2,
            handshake_timeout: Duration::from_secs(1),
            max_connections: 4,
            reserved_for_trusted: 2,
            max_connections_per_address: 1,
            idle_timeout: Duration::from_secs(1),
        };
        Gate::new(l, Box::new(move |_| privileged))
    }

    #[test]
    fn handshakes_are_capped_in_total_and_per_address() {
        let g = gate(false);
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let h1 = g.begin(Some(a), "a").unwrap();
        let _h2 = g.begin(Some(a), "a").unwrap();
        assert!(g.begin(Some(a), "a").is_none(), "third from one address");
        let _h3 = g.begin(Some(b), "b").unwrap();
        assert!(g.begin(Some(b), "b").is_none(), "fourth in total");
        drop(h1);
        assert!(g.begin(Some(b), "b").is_some(), "a slot is free again");
    }

    #[test]
    fn the_reserve_is_for_privileged_callers_only() {
        let others = gate(false);
        let id = NodeId::of(b"x");
        let addrs: Vec<IpAddr> = (1..=4)
            .map(|i| format!("10.0.0.{i}").parse().unwrap())
            .collect();
        let c1 = others.admit(others.begin(Some(addrs[0]), "").unwrap(), Some(&id), "");
        assert!(c1.is_some());
        assert!(
            others
                .admit(others.begin(Some(addrs[0]), "").unwrap(), None, "")
                .is_none(),
            "second from one address"
        );
        let _c2 = others
            .admit(others.begin(Some(addrs[1]), "").unwrap(), None, "")
            .unwrap();
        assert!(
            others
                .admit(others.begin(Some(addrs[2]), "").unwrap(), None, "")
                .is_none(),
            "the last two are reserved"
        );
        let trusted = gate(true);
        let held: Vec<_> = addrs
            .iter()
            .map(|a| {
                trusted
                    .admit(trusted.begin(Some(*a), "").unwrap(), Some(&id), "")
                    .unwrap()
            })
            .collect();
        assert!(
            trusted
                .admit(trusted.begin(Some(addrs[0]), "").unwrap(), Some(&id), "")
                .is_none(),
            "max_connections binds everyone"
        );
        drop(held);
    }
}
