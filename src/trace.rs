//! Observability hooks: with the `tracing` feature, events at the points an
//! operator cares about (recovery, torn tails, compaction, I/O failures);
//! without it, nothing is compiled in.

/// Emits a `tracing` event at `$level` when the `tracing` feature is on.
macro_rules! event {
    ($level:ident, $($arg:tt)+) => {
        #[cfg(feature = "tracing")]
        {
            ::tracing::$level!(target: "idemkv", $($arg)+);
        }
    };
}

pub(crate) use event;
