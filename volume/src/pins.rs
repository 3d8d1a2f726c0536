//! Read pins: a read maps a request to bytes in local files (a log segment, the cache
//! file) and the transport moves them later, on its own time. Anything that would move
//! or free such bytes (retiring a log segment, evicting cache blocks, overwriting a cache
//! block with newer data) first stops new reads from mapping them, then waits here until
//! every read that started before has dropped its pin. Epochs make that cheap: a pin
//! counts in the epoch current when it was taken; a retirement bumps the epoch and waits
//! (or defers its action) until no pin of an older epoch is left.

use std::collections::BTreeMap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

type Action = Box<dyn FnOnce() + Send>;

#[derive(Default)]
struct State {
    epoch: u64,
    /// Pins held, per epoch.
    held: BTreeMap<u64, u64>,
    /// Actions to run once no pin of their epoch or an older one is held.
    deferred: Vec<(u64, Action)>,
}

impl State {
    fn clear_of(&self, epoch: u64) -> bool {
        self.held.keys().next().is_none_or(|&oldest| oldest > epoch)
    }
}

/// The pins of one volume.
#[derive(Default)]
pub struct Pins {
    state: Mutex<State>,
    changed: Condvar,
}

/// A held pin; dropping it releases it.
pub struct Pin {
    pins: Arc<Pins>,
    epoch: u64,
}

impl Drop for Pin {
    fn drop(&mut self) {
        let mut state = self.pins.lock();
        if let Some(count) = state.held.get_mut(&self.epoch) {
            *count -= 1;
            if *count == 0 {
                state.held.remove(&self.epoch);
            }
        }
        drop(state);
        self.pins.changed.notify_all();
    }
}

impl Pins {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn pin(self: &Arc<Self>) -> Pin {
        let mut state = self.lock();
        let epoch = state.epoch;
        *state.held.entry(epoch).or_default() += 1;
        Pin {
            pins: self.clone(),
            epoch,
        }
    }

    /// Ends the current epoch; returns it.
    fn close_epoch(state: &mut State) -> u64 {
        let closed = state.epoch;
        state.epoch += 1;
        closed
    }

    /// Blocks until every pin taken before this call is released.
    pub fn wait_older(&self) {
        let mut state = self.lock();
        let closed = Self::close_epoch(&mut state);
        while !state.clear_of(closed) {
            state = self
                .changed
                .wait_timeout(state, Duration::from_millis(100))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Queues `action` to run (from [`Self::run_ready`]) once every pin taken before this
    /// call is released.
    pub fn defer(&self, action: impl FnOnce() + Send + 'static) {
        let mut state = self.lock();
        let closed = Self::close_epoch(&mut state);
        state.deferred.push((closed, Box::new(action)));
        drop(state);
        self.changed.notify_all();
    }

    /// Runs the deferred actions whose pins are gone; returns how many ran. Called from a
    /// background thread (the actions may unlink files, which request threads may not).
    pub fn run_ready(&self) -> usize {
        let ready: Vec<Action> = {
            let mut state = self.lock();
            let mut ready = Vec::new();
            let mut kept = Vec::new();
            for (epoch, action) in std::mem::take(&mut state.deferred) {
                if state.clear_of(epoch) {
                    ready.push(action);
                } else {
                    kept.push((epoch, action));
                }
            }
            state.deferred = kept;
            ready
        };
        let ran = ready.len();
        for action in ready {
            action();
        }
        ran
    }

    /// Deferred actions waiting.
    pub fn pending(&self) -> usize {
        self.lock().deferred.len()
    }

    /// Pins held now.
    pub fn held(&self) -> u64 {
        self.lock().held.values().sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    #[test]
    fn deferred_actions_wait_for_older_pins_only() {
        let pins = Arc::new(Pins::default());
        let old = pins.pin();
        let ran = Arc::new(AtomicBool::new(false));
        let flag = ran.clone();
        pins.defer(move || flag.store(true, Ordering::SeqCst));
        let newer = pins.pin();
        assert_eq!(pins.run_ready(), 0);
        assert!(!ran.load(Ordering::SeqCst));
        drop(old);
        // The pin taken after the retirement does not hold it back.
        assert_eq!(pins.run_ready(), 1);
        assert!(ran.load(Ordering::SeqCst));
        drop(newer);
        assert_eq!(pins.held(), 0);
    }

    #[test]
    fn wait_older_returns_once_older_pins_are_released() {
        let pins = Arc::new(Pins::default());
        let old = pins.pin();
        let waiter = {
            let pins = pins.clone();
            std::thread::spawn(move || pins.wait_older())
        };
        while pins.lock().epoch == 0 {
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(Duration::from_millis(20));
        assert!(!waiter.is_finished());
        let _newer = pins.pin();
        drop(old);
        waiter.join().unwrap();
    }
}
