//! One live session per agent identity: whether a hello may take over the session its agent
//! id already has. A pure rule, so that it is tested without processes.
//!
//! The agent process draws a random `instance` nonce at start and never shows it. A hello
//! with the live session's instance is that process reconnecting (its TCP broke): it
//! replaces the session. A hello with another instance is another process: the restarted
//! agent (the old process is gone, but its stream may not have closed here yet) or a copy
//! of the agent's key on another machine. It is let in only once the live session is no
//! longer live: closed (then there is no live session at all) or silent for longer than
//! two of its own heartbeat intervals (which the live session declared at its hello, so a
//! newcomer cannot shorten them). Until then it is refused with a retryable status; a
//! newcomer from another boot of the host or another address is recorded as a possible
//! cloned key.

use std::net::IpAddr;
use std::time::Duration;

use kiln_proto::v1;

/// What the coordinator remembers of a live session's hello.
#[derive(Debug, Clone, Default)]
pub struct Speaker {
    /// The agent process's nonce ("" from an agent too old to send one: never matches).
    pub instance: String,
    pub boot_id: String,
    pub pid: u32,
    pub hostname: String,
    pub peer: Option<IpAddr>,
    /// Zero when not declared.
    pub heartbeat_interval: Duration,
}

impl Speaker {
    pub fn of(hello: &v1::Hello, peer: Option<IpAddr>) -> Speaker {
        Speaker {
            instance: hello.instance.clone(),
            boot_id: hello.boot_id.clone(),
            pid: hello.pid,
            hostname: hello
                .host
                .as_ref()
                .map(|host| host.hostname.clone())
                .unwrap_or_default(),
            peer,
            heartbeat_interval: Duration::from_millis(hello.heartbeat_interval_ms),
        }
    }

    /// How long this session may be silent and still count as live.
    pub fn grace(&self, ttl: Duration) -> Duration {
        if self.heartbeat_interval.is_zero() {
            return ttl / 3;
        }
        (self.heartbeat_interval * 2)
            .max(Duration::from_millis(500))
            .min(ttl / 2)
    }

    /// Whether `other` is this very process.
    fn same_process(&self, other: &Speaker) -> bool {
        !self.instance.is_empty() && self.instance == other.instance
    }

    /// Whether `other` says it runs on the same boot of the same host, from the same
    /// address: a restart whose old connection has not closed here yet, most likely.
    fn same_host(&self, other: &Speaker) -> bool {
        !self.boot_id.is_empty() && self.boot_id == other.boot_id && self.peer == other.peer
    }

    /// For the log and the agent's record.
    pub fn describe(&self) -> String {
        let peer = self
            .peer
            .map_or_else(|| "-".to_string(), |ip| ip.to_string());
        let boot = if self.boot_id.is_empty() {
            "-"
        } else {
            &self.boot_id
        };
        format!(
            "host `{}` at {peer}, boot {boot}, pid {}",
            self.hostname, self.pid
        )
    }
}

/// What to do with a hello for an agent id that has a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The same process reconnecting.
    Reconnect,
    /// Another process, and the live session has been silent past its grace.
    TakeOver,
    /// Another process while the session is live. `suspicious`: it comes from another boot
    /// or address than the live session (a possible copy of the key), not a local restart.
    Refuse { grace: Duration, suspicious: bool },
}

/// Judges a `newcomer`'s hello against the `live` session, heard from `silent_for` ago
/// (`None`: not watched any more, i.e. not live).
pub fn judge(
    live: &Speaker,
    newcomer: &Speaker,
    silent_for: Option<Duration>,
    ttl: Duration,
) -> Verdict {
    if live.same_process(newcomer) {
        return Verdict::Reconnect;
    }
    let grace = live.grace(ttl);
    match silent_for {
        Some(silent) if silent <= grace => Verdict::Refuse {
            grace,
            suspicious: !live.same_host(newcomer),
        },
        _ => Verdict::TakeOver,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn speaker(instance: &str, boot: &str, peer: &str) -> Speaker {
        Speaker {
            instance: instance.into(),
            boot_id: boot.into(),
            pid: 7,
            hostname: "gpu-1".into(),
            peer: Some(peer.parse().unwrap()),
            heartbeat_interval: Duration::from_secs(1),
        }
    }

    #[test]
    fn only_the_same_process_or_a_silent_session_gives_way() {
        const TTL: Duration = Duration::from_secs(30);
        let ms = Duration::from_millis;
        let live = speaker("n1", "b1", "10.0.0.1");
        let check = |newcomer: Speaker, silent: Option<Duration>, expected: Verdict| {
            assert_eq!(
                judge(&live, &newcomer, silent, TTL),
                expected,
                "{newcomer:?}, {silent:?}"
            );
        };
        let refused = |suspicious| Verdict::Refuse {
            grace: ms(2000),
            suspicious,
        };
        // The same process, whatever else it says and however live its old session.
        check(
            speaker("n1", "b9", "10.9.9.9"),
            Some(ms(0)),
            Verdict::Reconnect,
        );
        // A restart on the same host while the old stream lingers: refused, not suspicious,
        // until two heartbeat intervals of silence.
        check(
            speaker("n2", "b1", "10.0.0.1"),
            Some(ms(300)),
            refused(false),
        );
        check(
            speaker("n2", "b1", "10.0.0.1"),
            Some(ms(2001)),
            Verdict::TakeOver,
        );
        // A copy elsewhere (another boot or address) while the agent is live: suspicious.
        check(
            speaker("n2", "b2", "10.0.0.1"),
            Some(ms(1500)),
            refused(true),
        );
        check(speaker("n2", "b1", "10.0.0.2"), Some(ms(10)), refused(true));
        check(speaker("", "", "10.0.0.1"), Some(ms(10)), refused(true));
        // Not watched any more (declared lost): nothing to protect.
        check(speaker("n2", "b2", "10.0.0.2"), None, Verdict::TakeOver);
        // An instance nobody sent never matches.
        let old = Speaker {
            instance: String::new(),
            ..live.clone()
        };
        assert_eq!(
            judge(&old, &old, Some(ms(10)), TTL),
            Verdict::Refuse {
                grace: ms(2000),
                suspicious: false
            }
        );
    }

    #[test]
    fn the_grace_is_two_heartbeats_within_bounds() {
        let ttl = Duration::from_secs(30);
        let with = |ms: u64| Speaker {
            heartbeat_interval: Duration::from_millis(ms),
            ..Speaker::default()
        };
        assert_eq!(with(0).grace(ttl), Duration::from_secs(10));
        assert_eq!(with(100).grace(ttl), Duration::from_millis(500));
        assert_eq!(with(5000).grace(ttl), Duration::from_secs(10));
        assert_eq!(with(60_000).grace(ttl), Duration::from_secs(15));
        assert_eq!(
            with(100).grace(Duration::from_millis(400)),
            Duration::from_millis(200)
        );
    }
}
