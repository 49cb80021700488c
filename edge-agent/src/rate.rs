//! The upload bandwidth cap: one token bucket shared by every PUT of the agent.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// Chunk size of part bodies (no whole-part buffering). Each chunk is one read in tokio's
/// blocking pool, so smaller chunks cost CPU: 256 KiB keeps that small while a PUT holds
/// at most one chunk in memory.
pub const CHUNK_BYTES: usize = 256 * 1024;

/// A token bucket shared by every PUT: `rate` bytes per second, bursts up to one second.
/// The rate can change at run time (`config` command); 0 = unlimited.
#[derive(Debug)]
pub struct RateLimiter {
    /// (rate, tokens, last refill).
    state: Mutex<(f64, f64, Instant)>,
}

impl RateLimiter {
    pub fn new(bytes_per_sec: u64) -> Self {
        let rate = bytes_per_sec as f64;
        RateLimiter {
            state: Mutex::new((rate, rate, Instant::now())),
        }
    }

    /// The cap in bytes/s; 0 = unlimited.
    pub fn rate(&self) -> u64 {
        self.state.lock().map(|st| st.0 as u64).unwrap_or(0)
    }

    /// Changes the cap; bytes already waited for are not re-timed.
    pub fn set_rate(&self, bytes_per_sec: u64) {
        if let Ok(mut st) = self.state.lock() {
            let rate = bytes_per_sec as f64;
            let tokens = st.1.min(rate);
            *st = (rate, tokens, Instant::now());
        }
    }

    /// Takes `n` tokens, waiting as long as the debt requires.
    pub async fn acquire(&self, n: usize) {
        let wait = {
            let Ok(mut st) = self.state.lock() else {
                return;
            };
            let (rate, tokens, last) = *st;
            if rate <= 0.0 {
                return;
            }
            let now = Instant::now();
            let refilled = (tokens + now.duration_since(last).as_secs_f64() * rate).min(rate);
            let left = refilled - n as f64;
            *st = (rate, left, now);
            if left < 0.0 {
                Duration::from_secs_f64(-left / rate)
            } else {
                Duration::ZERO
            }
        };
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }

    /// Read size of part bodies at the current rate: about a quarter second of bytes.
    pub fn chunk(&self) -> usize {
        match self.rate() {
            0 => CHUNK_BYTES,
            r => ((r / 4) as usize).clamp(4 * 1024, CHUNK_BYTES),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn rate_limiter_spreads_bytes_over_time() {
        let l = RateLimiter::new(1000);
        let start = Instant::now();
        l.acquire(1000).await; // the initial burst
        assert!(start.elapsed() < Duration::from_millis(10));
        l.acquire(500).await;
        assert!(start.elapsed() >= Duration::from_millis(499));
        l.acquire(1000).await;
        assert!(start.elapsed() >= Duration::from_millis(1499));
        assert!(start.elapsed() < Duration::from_millis(1600));
    }
}
