//! One instance's request queue (HTTP requests and `ask`s alike), as pure policy: a FIFO that
//! hands one request at a time to the worker when the instance is ready, waits through
//! restarts, and decides what happens to the request in flight when its run ends.
//!
//! - A request to an instance that is `failed` or `stopped` is refused; in every other state it
//!   waits (`starting`, `loading`, `backoff`, `waiting-for-memory`, `shed`, `stopping`).
//! - A request waits at most its timeout before it is dispatched.
//! - When a run ends with a request in flight, a request that has sent nothing to its client
//!   goes back to the head of the queue, once; otherwise it fails.
//! - When the instance becomes `failed` or `stopped` (or is removed), everything waiting fails.
//!
//! Request ids are the caller's; the queue never looks inside a request.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::lifecycle::State;

/// Why a request was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The queue holds its maximum already (HTTP 429).
    Full,
    /// The instance is `failed` or `stopped`: nothing would ever serve it (HTTP 503).
    Unavailable,
}

/// What became of the request in flight when its run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunEnded {
    /// Nothing was in flight.
    Idle,
    /// It had sent nothing to its client and had not been retried: it is at the head of the
    /// queue again, for the next run.
    Requeued(u64),
    /// It had sent part of its answer, or was already retried once: it fails.
    Failed(u64),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Waiting {
    id: u64,
    expires: Instant,
    retried: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct InFlight {
    id: u64,
    /// Part of the answer reached the client: it cannot be served again from the start.
    sent: bool,
    retried: bool,
    /// Its client went away and the worker was told to stop it.
    cancelled: bool,
}

/// Whether requests to an instance in `state` wait for it (or are refused).
pub fn waits_in(state: State) -> bool {
    !matches!(state, State::Failed | State::Stopped)
}

#[derive(Debug, Clone)]
pub struct Queue {
    waiting: VecDeque<Waiting>,
    in_flight: Option<InFlight>,
    cap: usize,
    timeout: Duration,
}

impl Queue {
    /// A queue of at most `cap` waiting requests, each waiting at most `timeout`.
    pub fn new(cap: usize, timeout: Duration) -> Queue {
        Queue {
            waiting: VecDeque::new(),
            in_flight: None,
            cap: cap.max(1),
            timeout,
        }
    }

    /// Requests waiting (not the one in flight).
    pub fn len(&self) -> usize {
        self.waiting.len()
    }

    pub fn is_empty(&self) -> bool {
        self.waiting.is_empty()
    }

    /// The request the worker is serving, if any.
    pub fn in_flight(&self) -> Option<u64> {
        self.in_flight.map(|f| f.id)
    }

    /// Nothing waits and nothing is in flight.
    pub fn idle(&self) -> bool {
        self.waiting.is_empty() && self.in_flight.is_none()
    }

    /// Queues request `id` at the tail.
    pub fn push(&mut self, id: u64, state: State, now: Instant) -> Result<(), Refusal> {
        if !waits_in(state) {
            return Err(Refusal::Unavailable);
        }
        if self.waiting.len() >= self.cap {
            return Err(Refusal::Full);
        }
        self.waiting.push_back(Waiting {
            id,
            expires: crate::lifecycle::later(now, self.timeout),
            retried: false,
        });
        Ok(())
    }

    /// The request to send to the worker now, if the instance is ready and idle: it becomes the
    /// one in flight.
    pub fn dispatch(&mut self, state: State) -> Option<u64> {
        if state != State::Ready || self.in_flight.is_some() {
            return None;
        }
        let w = self.waiting.pop_front()?;
        self.in_flight = Some(InFlight {
            id: w.id,
            sent: false,
            retried: w.retried,
            cancelled: false,
        });
        Some(w.id)
    }

    /// Part of request `id`'s answer reached its client.
    pub fn sent(&mut self, id: u64) {
        if let Some(f) = self.in_flight.as_mut().filter(|f| f.id == id) {
            f.sent = true;
        }
    }

    /// Request `id` is over (answered, refused by the worker, or cancelled and acknowledged).
    /// Returns whether it was the one in flight.
    pub fn finished(&mut self, id: u64) -> bool {
        if self.in_flight.is_some_and(|f| f.id == id) {
            self.in_flight = None;
            return true;
        }
        false
    }

    /// Request `id`'s client went away. A waiting request just leaves the queue (`false`); the
    /// request in flight stays in flight until the worker acknowledges (`true`: tell the worker
    /// to stop it). Unknown ids change nothing.
    pub fn cancel(&mut self, id: u64) -> bool {
        if let Some(f) = self.in_flight.as_mut().filter(|f| f.id == id) {
            let first = !f.cancelled;
            f.cancelled = true;
            return first;
        }
        self.waiting.retain(|w| w.id != id);
        false
    }

    /// The run serving this queue ended: what becomes of the request in flight. A requeued
    /// request waits a fresh timeout for the next run.
    pub fn run_ended(&mut self, now: Instant) -> RunEnded {
        let Some(f) = self.in_flight.take() else {
            return RunEnded::Idle;
        };
        if f.cancelled {
            return RunEnded::Failed(f.id);
        }
        if f.sent || f.retried {
            return RunEnded::Failed(f.id);
        }
        self.waiting.push_front(Waiting {
            id: f.id,
            expires: crate::lifecycle::later(now, self.timeout),
            retried: true,
        });
        RunEnded::Requeued(f.id)
    }

    /// Waiting requests whose timeout has passed leave the queue; their ids.
    pub fn expire(&mut self, now: Instant) -> Vec<u64> {
        let mut gone = Vec::new();
        self.waiting.retain(|w| {
            let keep = w.expires > now;
            if !keep {
                gone.push(w.id);
            }
            keep
        });
        gone
    }

    /// When the next waiting request times out.
    pub fn next_expiry(&self) -> Option<Instant> {
        self.waiting.iter().map(|w| w.expires).min()
    }

    /// Every request, waiting or in flight, leaves (the instance failed, stopped or went away);
    /// their ids, the one in flight first.
    pub fn drain(&mut self) -> Vec<u64> {
        self.in_flight
            .take()
            .map(|f| f.id)
            .into_iter()
            .chain(self.waiting.drain(..).map(|w| w.id))
            .collect()
    }

    /// Waiting requests only leave; the one in flight stays (its run is still serving it).
    pub fn drain_waiting(&mut self) -> Vec<u64> {
        self.waiting.drain(..).map(|w| w.id).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Duration = Duration::from_secs(60);

    #[test]
    fn one_at_a_time_in_order_and_only_when_ready() {
        let now = Instant::now();
        let mut q = Queue::new(8, T);
        for id in 1..=3 {
            q.push(id, State::Loading, now).unwrap();
        }
        assert_eq!(q.len(), 3);
        assert_eq!(q.dispatch(State::Loading), None, "not ready yet");
        assert_eq!(q.dispatch(State::Ready), Some(1));
        assert_eq!(q.dispatch(State::Ready), None, "one in flight at a time");
        assert!(q.finished(1));
        assert!(!q.finished(1), "only once");
        assert_eq!(q.dispatch(State::Ready), Some(2));
        assert!(q.finished(2));
        assert_eq!(q.dispatch(State::Ready), Some(3));
        assert_eq!(q.len(), 0);
        assert!(!q.idle());
        q.finished(3);
        assert!(q.idle());
    }

    #[test]
    fn refuses_when_full_or_when_nothing_will_serve() {
        let now = Instant::now();
        let mut q = Queue::new(2, T);
        for state in [
            State::Starting,
            State::Backoff,
            State::WaitingForMemory,
            State::Shed,
            State::Stopping,
        ] {
            assert!(waits_in(state), "{state:?}");
        }
        assert_eq!(q.push(1, State::Failed, now), Err(Refusal::Unavailable));
        assert_eq!(q.push(1, State::Stopped, now), Err(Refusal::Unavailable));
        q.push(1, State::Backoff, now).unwrap();
        q.push(2, State::Backoff, now).unwrap();
        assert_eq!(q.push(3, State::Backoff, now), Err(Refusal::Full));
        // The one in flight does not count against the cap.
        assert_eq!(q.dispatch(State::Ready), Some(1));
        q.push(3, State::Ready, now).unwrap();
    }

    #[test]
    fn a_request_that_sent_nothing_is_served_again_by_the_next_run_once() {
        let now = Instant::now();
        let mut q = Queue::new(8, T);
        q.push(1, State::Ready, now).unwrap();
        q.push(2, State::Ready, now).unwrap();
        assert_eq!(q.dispatch(State::Ready), Some(1));
        assert_eq!(q.run_ended(now), RunEnded::Requeued(1));
        assert_eq!(q.dispatch(State::Starting), None);
        assert_eq!(q.dispatch(State::Ready), Some(1), "back at the head");
        assert_eq!(q.run_ended(now), RunEnded::Failed(1), "only once");
        assert_eq!(q.dispatch(State::Ready), Some(2));
        q.sent(2);
        assert_eq!(
            q.run_ended(now),
            RunEnded::Failed(2),
            "part of it reached the client"
        );
        assert_eq!(q.run_ended(now), RunEnded::Idle);
    }

    #[test]
    fn waiting_requests_time_out_and_a_requeued_one_gets_a_fresh_timeout() {
        let t0 = Instant::now();
        let mut q = Queue::new(8, T);
        q.push(1, State::Loading, t0).unwrap();
        q.push(2, State::Loading, t0 + Duration::from_secs(30))
            .unwrap();
        assert_eq!(q.next_expiry(), Some(t0 + T));
        assert!(q.expire(t0 + Duration::from_secs(59)).is_empty());
        assert_eq!(q.expire(t0 + T), vec![1]);
        assert_eq!(q.dispatch(State::Ready), Some(2));
        let later = t0 + Duration::from_secs(100);
        assert_eq!(q.run_ended(later), RunEnded::Requeued(2));
        assert_eq!(q.next_expiry(), Some(later + T));
    }

    #[test]
    fn cancel_removes_a_waiting_request_and_flags_the_one_in_flight_once() {
        let now = Instant::now();
        let mut q = Queue::new(8, T);
        for id in 1..=3 {
            q.push(id, State::Ready, now).unwrap();
        }
        assert_eq!(q.dispatch(State::Ready), Some(1));
        assert!(!q.cancel(2), "a waiting one just leaves");
        assert_eq!(q.len(), 1);
        assert!(q.cancel(1), "tell the worker");
        assert!(!q.cancel(1), "and only once");
        assert_eq!(
            q.dispatch(State::Ready),
            None,
            "still in flight until acknowledged"
        );
        assert!(!q.cancel(99));
        // A cancelled request whose run dies is not served again.
        assert_eq!(q.run_ended(now), RunEnded::Failed(1));
        assert_eq!(q.dispatch(State::Ready), Some(3));
    }

    #[test]
    fn drain_takes_everything_the_one_in_flight_first() {
        let now = Instant::now();
        let mut q = Queue::new(8, T);
        for id in 1..=3 {
            q.push(id, State::Ready, now).unwrap();
        }
        q.dispatch(State::Ready);
        let mut w = q.clone();
        assert_eq!(w.drain_waiting(), vec![2, 3]);
        assert_eq!(w.in_flight(), Some(1));
        assert_eq!(q.drain(), vec![1, 2, 3]);
        assert!(q.idle());
    }
}
