//! The faults the proxy injects ([`Faults`]), what it plans for each connection at accept,
//! and how many it applied.

/// Closing a connection after some bytes from the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cut {
    /// Bytes forwarded from the client before the connection is closed.
    pub after_bytes: u64,
    /// Which connections: those whose number is a multiple of this (1 or 0: every one).
    pub every_nth: u64,
    /// How many more connections to cut (None: no limit). Counts down as cuts are planned.
    pub remaining: Option<u64>,
    /// Close with RST (`SO_LINGER` 0) instead of FIN.
    pub reset: bool,
}

/// Flipping one byte of one connection's client → storage stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Corrupt {
    /// The connection's number (from 1, in accept order).
    pub connection: u64,
    /// Offset in that connection's client → storage stream (headers included).
    pub offset: u64,
}

/// The faults applied to connections accepted from now on.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Faults {
    pub cut: Option<Cut>,
    /// Fraction (0.0–1.0) of connections to black-hole: read, never forwarded or answered.
    pub black_hole: f64,
    pub corrupt: Option<Corrupt>,
    /// Reset (RST) the connection whose bytes carry the proxy's client → storage total
    /// across each multiple of this many bytes, counted from [`CountingProxy::set_faults`],
    /// on every connection, open or new (None: off).
    pub reset_every_bytes: Option<u64>,
}

impl Faults {
    /// Cut one connection (the next one accepted) after `after_bytes`.
    pub fn cut_once(after_bytes: u64, reset: bool) -> Faults {
        Faults {
            cut: Some(Cut {
                after_bytes,
                every_nth: 1,
                remaining: Some(1),
                reset,
            }),
            ..Faults::default()
        }
    }

    /// Reset the connection carrying the total across every multiple of `bytes` (from all
    /// clients together, counted from when the faults are set).
    pub fn reset_every_bytes(bytes: u64) -> Faults {
        Faults {
            reset_every_bytes: Some(bytes.max(1)),
            ..Faults::default()
        }
    }

    /// Cut every `every_nth` connection after `after_bytes`, without limit.
    pub fn cut_every(every_nth: u64, after_bytes: u64, reset: bool) -> Faults {
        Faults {
            cut: Some(Cut {
                after_bytes,
                every_nth,
                remaining: None,
                reset,
            }),
            ..Faults::default()
        }
    }
}

/// What happens to one connection, decided at accept.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Plan {
    /// (bytes, reset)
    pub(super) cut: Option<(u64, bool)>,
    pub(super) black_hole: bool,
    pub(super) corrupt_at: Option<u64>,
}

/// How many faults were applied so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FaultCounts {
    pub cuts: u64,
    pub resets: u64,
    pub black_holed: u64,
    pub corrupted: u64,
}

#[derive(Debug)]
pub(super) struct FaultState {
    pub(super) faults: Faults,
    pub(super) rng: rand::rngs::StdRng,
    pub(super) counts: FaultCounts,
    /// [`Faults::reset_every_bytes`] and the client → storage total when it was set.
    pub(super) link_reset: Option<(u64, u64)>,
}
