//! Per-caller request rate limits (`--rate-limit 1000/s --rate-burst 2000`, off by default).
//!
//! One token bucket (governor's GCRA) per caller: per token subject for requests with a verified
//! token, per client address for the others, so one client cannot spend another's allowance by
//! sending without a token. IPv6 addresses count per /64, the block one host usually holds, so
//! walking through the addresses of one's own block does not escape the limit. A request over
//! the limit is answered 429 with `Retry-After` before it is routed.
//!
//! The buckets live in a map keyed by caller. A cleanup task periodically forgets the buckets
//! that are full again (indistinguishable from a fresh one), so the map holds only the callers
//! seen within about one burst's refill time, whatever the number of callers over time.

use std::{
    fmt,
    net::{IpAddr, Ipv6Addr},
    num::NonZeroU32,
    str::FromStr,
    sync::Arc,
    time::Duration,
};

use axum::{
    http::{header, HeaderValue, StatusCode},
    response::Response,
};
use governor::{clock::Clock, DefaultKeyedRateLimiter, Quota};
use tokio_util::sync::CancellationToken;

use crate::error::json_error;

/// How often the cleanup task forgets refilled buckets.
const CLEANUP_INTERVAL: Duration = Duration::from_secs(10);

/// A rate: `1000/s`, `60/m` (also `/sec`, `/second`, `/min`, `/minute`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub count: NonZeroU32,
    pub per: Period,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Period {
    Second,
    Minute,
}

impl FromStr for Rate {
    type Err = String;

    fn from_str(text: &str) -> Result<Rate, String> {
        let usage = || format!("{text:?} is not a rate such as 1000/s or 600/m");
        let (count, per) = text.trim().split_once('/').ok_or_else(usage)?;
        let count: u32 = count.trim().parse().map_err(|_| usage())?;
        let count = NonZeroU32::new(count).ok_or_else(|| "a rate must be above 0".to_owned())?;
        let per = match per.trim().to_ascii_lowercase().as_str() {
            "s" | "sec" | "second" => Period::Second,
            "m" | "min" | "minute" => Period::Minute,
            _ => return Err(usage()),
        };
        Ok(Rate { count, per })
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let per = match self.per {
            Period::Second => "s",
            Period::Minute => "m",
        };
        write!(f, "{}/{per}", self.count)
    }
}

/// The limit every caller gets: a sustained rate, and how many requests may come at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    pub rate: Rate,
    /// The bucket's size; the rate's count when not given.
    pub burst: Option<NonZeroU32>,
}

impl RateLimit {
    fn quota(&self) -> Quota {
        let quota = match self.rate.per {
            Period::Second => Quota::per_second(self.rate.count),
            Period::Minute => Quota::per_minute(self.rate.count),
        };
        match self.burst {
            Some(burst) => quota.allow_burst(burst),
            None => quota,
        }
    }
}

/// Whose bucket a request takes from.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum RateKey {
    /// A verified token's subject.
    Subject(Arc<str>),
    /// A client address (IPv6 reduced to its /64).
    Address(IpAddr),
    /// A request whose client address is unknown (the server did not record it).
    Unknown,
}

impl RateKey {
    /// The key of a caller without a subject, by its address.
    pub fn address(ip: IpAddr) -> RateKey {
        RateKey::Address(match ip.to_canonical() {
            IpAddr::V6(v6) => {
                let prefix = u128::from(v6) & !((1u128 << 64) - 1);
                IpAddr::V6(Ipv6Addr::from(prefix))
            }
            v4 => v4,
        })
    }
}

/// The buckets of every caller; shared by all requests.
pub struct RateLimiter {
    limiter: DefaultKeyedRateLimiter<RateKey>,
}

impl fmt::Debug for RateLimiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimiter")
            .field("callers", &self.limiter.len())
            .finish()
    }
}

impl RateLimiter {
    pub fn new(limit: RateLimit) -> RateLimiter {
        RateLimiter {
            limiter: governor::RateLimiter::keyed(limit.quota()),
        }
    }

    /// Takes one request from `key`'s bucket; when it is empty, how long until it has one
    /// again.
    pub fn check(&self, key: &RateKey) -> Result<(), Duration> {
        self.limiter
            .check_key(key)
            .map_err(|not_until| not_until.wait_time_from(self.limiter.clock().now()))
    }

    /// The number of callers with a bucket now.
    pub fn callers(&self) -> usize {
        self.limiter.len()
    }

    /// Forgets the buckets that are full again.
    pub fn forget_idle(&self) {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
    }

    /// Runs [`RateLimiter::forget_idle`] periodically until `shutdown`.
    pub fn spawn_cleanup(self: &Arc<Self>, shutdown: CancellationToken) {
        let limiter = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(CLEANUP_INTERVAL);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = ticks.tick() => {}
                }
                let Some(limiter) = limiter.upgrade() else {
                    break;
                };
                limiter.forget_idle();
            }
        });
    }
}

/// The 429 answer for a caller that must wait `wait`.
pub fn too_many_requests(wait: Duration) -> Response {
    let secs = retry_after_secs(wait);
    let mut response = json_error(
        StatusCode::TOO_MANY_REQUESTS,
        &format!("too many requests; retry in {secs} s"),
    );
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(secs));
    response
}

/// The `Retry-After` value for a wait: whole seconds, rounded up, at least 1.
pub fn retry_after_secs(wait: Duration) -> u64 {
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    secs.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limit(rate: &str, burst: Option<u32>) -> RateLimit {
        RateLimit {
            rate: rate.parse().unwrap(),
            burst: burst.and_then(NonZeroU32::new),
        }
    }

    #[test]
    fn rates_parse_per_second_and_per_minute() {
        let rate: Rate = "1000/s".parse().unwrap();
        assert_eq!((rate.count.get(), rate.per), (1000, Period::Second));
        let rate: Rate = " 60 / min ".parse().unwrap();
        assert_eq!((rate.count.get(), rate.per), (60, Period::Minute));
        assert_eq!("5/m".parse::<Rate>().unwrap().to_string(), "5/m");
        for bad in ["", "1000", "0/s", "-1/s", "ten/s", "5/h", "5/"] {
            assert!(bad.parse::<Rate>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_caller_over_its_burst_waits_and_others_do_not() {
        let limiter = RateLimiter::new(limit("1/m", Some(2)));
        let alice = RateKey::Subject("alice".into());
        assert!(limiter.check(&alice).is_ok());
        assert!(limiter.check(&alice).is_ok());
        let wait = limiter.check(&alice).unwrap_err();
        assert!(wait > Duration::ZERO && wait <= Duration::from_secs(60));
        assert!(limiter.check(&RateKey::Subject("bob".into())).is_ok());
        assert!(limiter
            .check(&RateKey::address("127.0.0.1".parse().unwrap()))
            .is_ok());
    }

    #[test]
    fn ipv6_addresses_of_one_block_share_a_bucket() {
        let a = RateKey::address("2001:db8::1".parse().unwrap());
        let b = RateKey::address("2001:db8::ffff:2".parse().unwrap());
        let other = RateKey::address("2001:db8:0:1::1".parse().unwrap());
        assert_eq!(a, b);
        assert_ne!(a, other);
        let mapped = RateKey::address("::ffff:10.0.0.1".parse().unwrap());
        assert_eq!(mapped, RateKey::address("10.0.0.1".parse().unwrap()));
    }

    #[test]
    fn retry_after_is_whole_seconds_rounded_up_and_at_least_one() {
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(10)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1500)), 2);
        assert_eq!(retry_after_secs(Duration::from_secs(3)), 3);
    }

    #[test]
    fn refilled_buckets_are_forgotten() {
        // A huge rate refills a bucket of one within nanoseconds, so after a short sleep the
        // bucket is full again and indistinguishable from a fresh one.
        let limiter = RateLimiter::new(limit("1000000/s", Some(1)));
        for i in 0..100u8 {
            let _ = limiter.check(&RateKey::address(IpAddr::from([10, 0, 0, i])));
        }
        assert_eq!(limiter.callers(), 100);
        std::thread::sleep(Duration::from_millis(20));
        limiter.forget_idle();
        assert_eq!(limiter.callers(), 0);
    }
}
