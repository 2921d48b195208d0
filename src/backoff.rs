//! The one backoff: exponential growth from an initial pause to a cap, with multiplicative
//! jitter. Pure and deterministic given the jitter draw, so policies are table-tested; every
//! retry loop in the agent (HTTP attempts, background module retries, accept errors) uses it.

use std::time::Duration;

use rand::Rng;

/// An exponential backoff policy.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    /// The pause before the first retry.
    pub initial: Duration,
    /// Growth per retry (2.0 doubles).
    pub factor: f64,
    /// No pause is longer (after jitter too).
    pub max: Duration,
    /// Each pause is scaled by a factor drawn from `1 ± jitter` (0: none).
    pub jitter: f64,
}

impl Backoff {
    /// The pause before retry `n` (1-based) for a jitter draw `j` in `[-1, 1]`.
    pub fn pause_with(&self, n: u32, j: f64) -> Duration {
        let exp = n.saturating_sub(1).min(64) as i32;
        let base = self.initial.as_secs_f64() * self.factor.powi(exp);
        let scaled = base * (1.0 + self.jitter * j.clamp(-1.0, 1.0));
        Duration::from_secs_f64(scaled.clamp(0.0, self.max.as_secs_f64()))
    }

    /// The pause before retry `n` (1-based), with a random jitter draw.
    pub fn pause(&self, n: u32) -> Duration {
        let j = if self.jitter > 0.0 {
            rand::rng().random_range(-1.0..=1.0)
        } else {
            0.0
        };
        self.pause_with(n, j)
    }

    /// A fixed pause (a recheck interval), jittered the same way.
    pub fn fixed(every: Duration, jitter: f64) -> Backoff {
        Backoff {
            initial: every,
            factor: 1.0,
            max: every.mul_f64(1.0 + jitter),
            jitter,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_grow_cap_and_jitter() {
        let ms = Duration::from_millis;
        let b = Backoff {
            initial: ms(500),
            factor: 1.5,
            max: Duration::from_secs(60),
            jitter: 0.5,
        };
        for (n, j, want) in [
            (1, 0.0, ms(500)),
            (2, 0.0, ms(750)),
            (1, -1.0, ms(250)),
            (1, 1.0, ms(750)),
            (40, 1.0, Duration::from_secs(60)),
            (u32::MAX, 0.0, Duration::from_secs(60)),
            (0, 0.0, ms(500)),
        ] {
            assert_eq!(b.pause_with(n, j), want, "n={n} j={j}");
        }
        let doubling = Backoff {
            initial: ms(5),
            factor: 2.0,
            max: Duration::from_secs(1),
            jitter: 0.0,
        };
        assert_eq!(doubling.pause(3), ms(20));
        assert_eq!(doubling.pause(20), Duration::from_secs(1));
        let every = Backoff::fixed(Duration::from_secs(300), 0.2);
        assert_eq!(every.pause_with(7, 0.0), Duration::from_secs(300));
        assert_eq!(every.pause_with(7, 1.0), Duration::from_secs(360));
        for _ in 0..100 {
            let p = every.pause(1);
            assert!(p >= Duration::from_secs(240) && p <= Duration::from_secs(360));
        }
    }
}
