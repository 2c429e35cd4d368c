//! What a replica does when it wants a new token and shares its provider with other replicas:
//! a pure function of what it holds, what Redis holds and how the lock went, so the rule of
//! one identity-provider call per rotation is tested as a table.

use sidecar_config::OnRedisDown;

/// What Redis holds for the provider, as read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum View {
    /// Nothing yet.
    Absent,
    /// A value this replica cannot use (damaged, foreign, another key); its generation as far as
    /// it could be read (0 when not at all). It is overwritten by the next commit.
    Damaged {
        /// Generation named by the value, else 0.
        generation: u64,
    },
    /// A token record.
    Valid {
        /// Its generation.
        generation: u64,
        /// Its access token may still be used.
        usable: bool,
    },
}

impl View {
    /// The generation a commit must find to succeed (the compare of compare-and-set).
    pub(crate) fn generation(self) -> u64 {
        match self {
            View::Absent => 0,
            View::Damaged { generation } | View::Valid { generation, .. } => generation,
        }
    }
}

/// How taking the refresh lock went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Lock {
    /// Not tried yet.
    NotTried,
    /// This replica holds it.
    Acquired,
    /// Another replica holds it: its refresh is running.
    HeldElsewhere,
}

/// What to do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Action {
    /// Another replica already has a newer, usable token: take it, no identity-provider call.
    Adopt,
    /// Try to take the refresh lock, then decide again.
    TryLock,
    /// Call the identity provider, then commit only if Redis still holds generation `expect`.
    /// `shared_refresh_token`: the refresh token to spend is the one in Redis (it is at least as
    /// new as the local one).
    Call {
        /// The generation the commit compares against.
        expect: u64,
        /// Use the refresh token of the shared record.
        shared_refresh_token: bool,
    },
    /// Another replica is refreshing: wait for its publication (or for its lease to run out).
    Wait,
    /// Redis is down and `on_redis_down: local`: refresh alone.
    Alone,
    /// Redis is down and `on_redis_down: fail_closed`: no identity-provider call; the current
    /// token serves until it expires.
    Refuse,
}

/// The decision. `local`: the generation this replica holds (a request's rejected generation
/// `g` is never newer than it, so "refresh only if `g` is still current" is "refresh only if
/// nothing newer than `local` is shared"). `view`: `None` when Redis could not be read.
/// `lock_down`: the lock call failed.
pub(crate) fn decide(
    local: u64,
    view: Option<View>,
    lock: Lock,
    lock_down: bool,
    mode: OnRedisDown,
) -> Action {
    let Some(view) = view.filter(|_| !lock_down) else {
        return match mode {
            OnRedisDown::Local => Action::Alone,
            OnRedisDown::FailClosed => Action::Refuse,
        };
    };
    if let View::Valid {
        generation,
        usable: true,
    } = view
    {
        if generation > local {
            return Action::Adopt;
        }
    }
    match lock {
        Lock::NotTried => Action::TryLock,
        Lock::HeldElsewhere => Action::Wait,
        Lock::Acquired => Action::Call {
            expect: view.generation(),
            shared_refresh_token: matches!(view, View::Valid { generation, .. } if generation >= local),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Action::*;
    use OnRedisDown::{FailClosed, Local};

    const fn valid(generation: u64, usable: bool) -> Option<View> {
        Some(View::Valid { generation, usable })
    }

    /// local, view, lock, lock call failed, mode, expected action, why.
    type Row = (
        u64,
        Option<View>,
        Lock,
        bool,
        OnRedisDown,
        Action,
        &'static str,
    );

    #[test]
    fn the_table() {
        let call = |expect, shared_refresh_token| Call {
            expect,
            shared_refresh_token,
        };
        #[rustfmt::skip]
        let table: &[Row] = &[
            // Redis down: the mode decides, whatever else.
            (3, None, Lock::NotTried, false, Local, Alone, "down, local: alone"),
            (3, None, Lock::NotTried, false, FailClosed, Refuse, "down, fail_closed: refuse"),
            (3, valid(5, true), Lock::NotTried, true, FailClosed, Refuse, "lock call failed, fail_closed"),
            (3, valid(5, true), Lock::NotTried, true, Local, Alone, "lock call failed, local"),
            // A newer usable shared token: adopt, with or without the lock (no IdP call).
            (3, valid(4, true), Lock::NotTried, false, Local, Adopt, "another replica refreshed"),
            (3, valid(4, true), Lock::Acquired, false, Local, Adopt, "committed between read and lock"),
            (3, valid(4, true), Lock::HeldElsewhere, false, FailClosed, Adopt, "newer token while another refreshes"),
            // The 401 generation rule: g (= local) still current → refresh; lock first.
            (3, valid(3, true), Lock::NotTried, false, Local, TryLock, "g is still the shared current one"),
            (3, valid(3, true), Lock::Acquired, false, Local, call(3, true), "lock holder calls, expects g"),
            (3, valid(3, true), Lock::HeldElsewhere, false, Local, Wait, "loser waits for the publication"),
            // A newer shared token that is no longer usable: its refresh token is the one to spend.
            (3, valid(7, false), Lock::NotTried, false, Local, TryLock, "newer but expired"),
            (3, valid(7, false), Lock::Acquired, false, Local, call(7, true), "refresh from the newer record"),
            // Redis lost its data or holds an older record: the generation still moves forward
            // from what Redis has (the commit compares with it), local refresh token kept.
            (9, valid(2, true), Lock::Acquired, false, Local, call(2, false), "older shared record"),
            (9, Some(View::Absent), Lock::NotTried, false, Local, TryLock, "nothing shared yet"),
            (0, Some(View::Absent), Lock::Acquired, false, Local, call(0, false), "first token of all"),
            // Damaged or foreign values are overwritten: compare with what the value names.
            (3, Some(View::Damaged { generation: 12 }), Lock::Acquired, false, Local, call(12, false), "damaged value"),
            (3, Some(View::Damaged { generation: 0 }), Lock::HeldElsewhere, false, Local, Wait, "damaged, lock held"),
        ];
        for (local, view, lock, lock_down, mode, want, why) in table {
            assert_eq!(
                decide(*local, *view, *lock, *lock_down, *mode),
                *want,
                "{why}"
            );
        }
    }

    #[test]
    fn proactive_refreshes_of_n_replicas_coalesce() {
        // N replicas holding generation 5 decide at once: one wins the lock, all others wait;
        // after the publication every one of them adopts. One call in all.
        let n = 10;
        let winners = (0..n)
            .map(|i| {
                if i == 0 {
                    Lock::Acquired
                } else {
                    Lock::HeldElsewhere
                }
            })
            .map(|lock| decide(5, valid(5, true), lock, false, Local))
            .filter(|a| matches!(a, Call { .. }))
            .count();
        assert_eq!(winners, 1);
        for lock in [Lock::NotTried, Lock::HeldElsewhere, Lock::Acquired] {
            assert_eq!(decide(5, valid(6, true), lock, false, Local), Adopt);
        }
    }
}
