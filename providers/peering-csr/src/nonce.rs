//! Single-use, expiring nonces a provider issues for consumers to sign.

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant, SystemTime},
};

use liqo_core::{Challenge, ClusterId};
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};

/// What a nonce may be used for: a signature made to ask for access cannot be replayed to give
/// it back, and the other way round.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Purpose {
    /// Ask for (or renew) a grant.
    Grant,
    /// Release a grant (unpeer).
    Release,
}

const NONCE_LEN: usize = 32;

#[derive(Debug)]
struct Issued {
    consumer: ClusterId,
    purpose: Purpose,
    expires: Instant,
}

/// The nonces a provider has issued and not yet seen used.
///
/// In memory: a provider restart invalidates outstanding challenges, which only costs the
/// consumer a retry. Bounded: at most `capacity` outstanding nonces; expired ones are dropped
/// first, and a full store refuses new challenges rather than forgetting live ones.
#[derive(Debug)]
pub(crate) struct NonceStore {
    issued: Mutex<HashMap<Vec<u8>, Issued>>,
    ttl: Duration,
    capacity: usize,
    rng: SystemRandom,
}

/// Why a nonce was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum NonceError {
    #[error("nonce is unknown or was already used (replayed?)")]
    Unknown,
    #[error("nonce expired")]
    Expired,
    #[error("nonce was issued to cluster {0}")]
    OtherConsumer(ClusterId),
    #[error("nonce was issued for {0:?}, not {1:?}")]
    WrongPurpose(Purpose, Purpose),
    #[error("too many outstanding challenges ({0}); retry shortly")]
    Full(usize),
    #[error("the system random generator failed")]
    Random,
}

impl NonceStore {
    pub(crate) fn new(ttl: Duration, capacity: usize) -> Self {
        Self {
            issued: Mutex::new(HashMap::new()),
            ttl,
            capacity,
            rng: SystemRandom::new(),
        }
    }

    /// Issues a fresh nonce for `consumer` and `purpose`.
    pub(crate) fn issue(
        &self,
        consumer: &ClusterId,
        purpose: Purpose,
    ) -> Result<Challenge, NonceError> {
        let mut nonce = vec![0u8; NONCE_LEN];
        self.rng.fill(&mut nonce).map_err(|_| NonceError::Random)?;
        let now = Instant::now();
        let mut issued = self.issued.lock().unwrap_or_else(|p| p.into_inner());
        issued.retain(|_, i| i.expires > now);
        if issued.len() >= self.capacity {
            return Err(NonceError::Full(self.capacity));
        }
        issued.insert(
            nonce.clone(),
            Issued {
                consumer: consumer.clone(),
                purpose,
                expires: now + self.ttl,
            },
        );
        Ok(Challenge {
            nonce,
            expires_at: SystemTime::now() + self.ttl,
        })
    }

    /// Consumes `nonce`: it is gone afterwards whether or not it was valid, so a failed attempt
    /// cannot be retried with the same nonce.
    pub(crate) fn consume(
        &self,
        nonce: &[u8],
        consumer: &ClusterId,
        purpose: Purpose,
    ) -> Result<(), NonceError> {
        let issued = self
            .issued
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(nonce)
            .ok_or(NonceError::Unknown)?;
        if issued.expires <= Instant::now() {
            return Err(NonceError::Expired);
        }
        if &issued.consumer != consumer {
            return Err(NonceError::OtherConsumer(issued.consumer));
        }
        if issued.purpose != purpose {
            return Err(NonceError::WrongPurpose(issued.purpose, purpose));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_use_bound_to_consumer_and_purpose() {
        let store = NonceStore::new(Duration::from_secs(60), 3);
        let a: ClusterId = "a".parse().unwrap();
        let b: ClusterId = "b".parse().unwrap();
        let c = store.issue(&a, Purpose::Grant).unwrap();
        assert_eq!(c.nonce.len(), NONCE_LEN);
        store.consume(&c.nonce, &a, Purpose::Grant).unwrap();
        assert_eq!(
            store.consume(&c.nonce, &a, Purpose::Grant),
            Err(NonceError::Unknown)
        );
        let c = store.issue(&a, Purpose::Grant).unwrap();
        assert_eq!(
            store.consume(&c.nonce, &b, Purpose::Grant),
            Err(NonceError::OtherConsumer(a.clone()))
        );
        // A failed attempt burns the nonce.
        assert_eq!(
            store.consume(&c.nonce, &a, Purpose::Grant),
            Err(NonceError::Unknown)
        );
        let c = store.issue(&a, Purpose::Release).unwrap();
        assert!(matches!(
            store.consume(&c.nonce, &a, Purpose::Grant),
            Err(NonceError::WrongPurpose(..))
        ));
    }

    #[test]
    fn expiry_and_capacity() {
        let store = NonceStore::new(Duration::ZERO, 2);
        let a: ClusterId = "a".parse().unwrap();
        let c = store.issue(&a, Purpose::Grant).unwrap();
        assert_eq!(
            store.consume(&c.nonce, &a, Purpose::Grant),
            Err(NonceError::Expired)
        );
        let store = NonceStore::new(Duration::from_secs(60), 2);
        store.issue(&a, Purpose::Grant).unwrap();
        store.issue(&a, Purpose::Grant).unwrap();
        assert_eq!(store.issue(&a, Purpose::Grant), Err(NonceError::Full(2)));
    }
}
