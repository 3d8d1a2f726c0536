//! A split virtqueue driver (the guest side) over [`GuestRam`].
//!
//! One `SplitQueue` is owned by one thread: there are no locks on the request path. The
//! descriptor free list is a plain stack of indices, and every chain we publish remembers the
//! descriptors it owns, so reclaiming never trusts `next` fields (which raw chains may corrupt
//! on purpose).

use std::cell::Cell;
use std::os::fd::AsRawFd;
use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vhost::VringConfigData;
use vm_memory::{Address, ByteValued, Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::memory::GuestRam;
use crate::Error;

/// The buffer continues via the `next` field.
pub const VIRTQ_DESC_F_NEXT: u16 = 1;
/// The buffer is device-writable (otherwise device-readable).
pub const VIRTQ_DESC_F_WRITE: u16 = 2;
/// The buffer holds a table of indirect descriptors.
pub const VIRTQ_DESC_F_INDIRECT: u16 = 4;

/// A descriptor exactly as laid out in the descriptor table.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Descriptor {
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
    pub next: u16,
}
// SAFETY: plain-old-data with no padding (8 + 4 + 2 + 2 bytes).
unsafe impl ByteValued for Descriptor {}

/// A guest buffer: where it is and how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Buffer {
    pub addr: GuestAddress,
    pub len: u32,
}

/// Where a hand-crafted descriptor's `next` field points.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RawNext {
    /// The table index of the following descriptor in the same raw chain (or 0 for the last).
    Following,
    /// The table index of the `n`-th descriptor of the same raw chain (builds loops).
    ChainPosition(usize),
    /// An arbitrary table index, which may be out of range.
    Index(u16),
}

/// A hand-crafted descriptor for tests of malformed chains: flags and `next` are written as
/// given, nothing is validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawDescriptor {
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
    pub next: RawNext,
}

/// An element the device put in the used ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UsedElement {
    /// Head descriptor index of the returned chain.
    pub head: u16,
    /// Bytes the device says it wrote into the chain's device-writable buffers.
    pub len: u32,
}

const AVAIL_RING_OFFSET: u64 = 4;
const USED_RING_OFFSET: u64 = 4;
const USED_ELEMENT_SIZE: u64 = 8;
const DESCRIPTOR_SIZE: u64 = 16;

/// The guest side of one split virtqueue.
pub struct SplitQueue {
    ram: Arc<GuestRam>,
    index: u16,
    size: u16,
    desc_table: GuestAddress,
    avail_ring: GuestAddress,
    used_ring: GuestAddress,
    free_descriptors: Vec<u16>,
    /// Per head index: the descriptors the chain owns; empty when not in flight.
    chains: Vec<Vec<u16>>,
    in_flight: usize,
    next_avail: u16,
    last_used: u16,
    /// VIRTIO_RING_F_EVENT_IDX was negotiated: kicks and calls are suppressed through the
    /// avail_event / used_event fields instead of being sent for every request.
    event_idx: bool,
    /// The available index at the previous [`SplitQueue::notify`], to decide whether the
    /// device asked for a kick in between (EVENT_IDX only).
    avail_at_last_notify: Cell<u16>,
    /// Kicks actually sent (eventfd writes), for load generators to report.
    kicks_sent: Cell<u64>,
    kick: EventFd,
    call: EventFd,
}

impl SplitQueue {
    /// Allocates the descriptor table and rings of a queue of `size` entries in guest memory.
    pub fn new(ram: Arc<GuestRam>, index: u16, size: u16) -> Result<Self, Error> {
        if size == 0 || !size.is_power_of_two() {
            return Err(Error::InvalidConfig(format!(
                "queue size {size} must be a non-zero power of two"
            )));
        }
        let entries = u64::from(size);
        let desc_table = ram.allocate(DESCRIPTOR_SIZE * entries, 4096)?;
        let avail_ring = ram.allocate(AVAIL_RING_OFFSET + 2 * entries + 2, 4096)?;
        let used_ring = ram.allocate(USED_RING_OFFSET + USED_ELEMENT_SIZE * entries + 2, 4096)?;
        // Popping from the end hands out low indices first, which keeps dumps readable.
        let free_descriptors = (0..size).rev().collect();
        Ok(Self {
            ram,
            index,
            size,
            desc_table,
            avail_ring,
            used_ring,
            free_descriptors,
            chains: vec![Vec::new(); usize::from(size)],
            in_flight: 0,
            next_avail: 0,
            last_used: 0,
            event_idx: false,
            avail_at_last_notify: Cell::new(0),
            kicks_sent: Cell::new(0),
            kick: EventFd::new(EFD_NONBLOCK).map_err(Error::EventFd)?,
            call: EventFd::new(EFD_NONBLOCK).map_err(Error::EventFd)?,
        })
    }

    /// The vhost-user queue index.
    pub fn index(&self) -> u16 {
        self.index
    }

    /// Switches kick/call suppression through event indices on or off. Must match the
    /// negotiated VIRTIO_RING_F_EVENT_IDX and be set before the device starts the queue.
    pub fn set_event_idx(&mut self, enabled: bool) {
        self.event_idx = enabled;
    }

    /// Whether event-index notification suppression is in use.
    pub fn event_idx(&self) -> bool {
        self.event_idx
    }

    /// Kicks sent to the device so far (with EVENT_IDX, fewer than notify calls).
    pub fn kicks_sent(&self) -> u64 {
        self.kicks_sent.get()
    }

    /// Number of descriptors in the table.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// Descriptors not owned by an in-flight chain.
    pub fn free_descriptors(&self) -> usize {
        self.free_descriptors.len()
    }

    /// Chains published and not yet returned by the device.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Guest address of the descriptor table.
    pub fn desc_table(&self) -> GuestAddress {
        self.desc_table
    }

    /// Guest address of the available ring.
    pub fn avail_ring(&self) -> GuestAddress {
        self.avail_ring
    }

    /// Guest address of the used ring.
    pub fn used_ring(&self) -> GuestAddress {
        self.used_ring
    }

    /// The eventfd we signal to kick the device.
    pub fn kick_fd(&self) -> &EventFd {
        &self.kick
    }

    /// The eventfd the device signals after filling the used ring.
    pub fn call_fd(&self) -> &EventFd {
        &self.call
    }

    /// The ring addresses for SET_VRING_ADDR, in this process's address space.
    pub fn config_data(&self) -> Result<VringConfigData, Error> {
        Ok(VringConfigData {
            queue_max_size: self.size,
            queue_size: self.size,
            flags: 0,
            desc_table_addr: self.ram.host_address(self.desc_table)?,
            used_ring_addr: self.ram.host_address(self.used_ring)?,
            avail_ring_addr: self.ram.host_address(self.avail_ring)?,
            log_addr: None,
        })
    }

    /// Publishes a chain of device-readable buffers followed by device-writable buffers and
    /// returns its head index. The device is not kicked: call [`SplitQueue::notify`].
    pub fn add_chain(&mut self, readable: &[Buffer], writable: &[Buffer]) -> Result<u16, Error> {
        let count = readable.len() + writable.len();
        if count == 0 {
            return Err(Error::InvalidRequest(
                "a chain needs at least one buffer".into(),
            ));
        }
        let descriptors = self.take_descriptors(count)?;
        let buffers = readable
            .iter()
            .map(|b| (b, 0))
            .chain(writable.iter().map(|b| (b, VIRTQ_DESC_F_WRITE)));
        for (position, (buffer, direction)) in buffers.enumerate() {
            let next = descriptors.get(position + 1).copied();
            let descriptor = Descriptor {
                addr: buffer.addr.0,
                len: buffer.len,
                flags: direction | if next.is_some() { VIRTQ_DESC_F_NEXT } else { 0 },
                next: next.unwrap_or(0),
            };
            self.write_descriptor(&descriptors, descriptors[position], descriptor)?;
        }
        self.publish(descriptors)
    }

    /// Writes one descriptor; on failure the chain's descriptors go back to the free list.
    fn write_descriptor(
        &mut self,
        chain: &[u16],
        index: u16,
        descriptor: Descriptor,
    ) -> Result<(), Error> {
        let addr = self.descriptor_address(index);
        if let Err(err) = self.ram.memory().write_obj(descriptor, addr) {
            self.free_descriptors.extend(chain.iter().rev());
            return Err(err.into());
        }
        Ok(())
    }

    /// Publishes a hand-crafted chain: each descriptor gets a free table slot and is written
    /// verbatim (flags, address, length), with `next` resolved as described by [`RawNext`].
    /// Returns the head index.
    pub fn add_raw_chain(&mut self, raw: &[RawDescriptor]) -> Result<u16, Error> {
        if raw.is_empty() {
            return Err(Error::InvalidRequest(
                "a chain needs at least one descriptor".into(),
            ));
        }
        let descriptors = self.take_descriptors(raw.len())?;
        for (position, spec) in raw.iter().enumerate() {
            let next = match spec.next {
                RawNext::Following => descriptors.get(position + 1).copied().unwrap_or(0),
                RawNext::ChainPosition(n) => match descriptors.get(n) {
                    Some(index) => *index,
                    None => {
                        self.free_descriptors.extend(descriptors.iter().rev());
                        return Err(Error::InvalidRequest(format!(
                            "chain position {n} does not exist in a chain of {}",
                            raw.len()
                        )));
                    }
                },
                RawNext::Index(index) => index,
            };
            let descriptor = Descriptor {
                addr: spec.addr,
                len: spec.len,
                flags: spec.flags,
                next,
            };
            self.write_descriptor(&descriptors, descriptors[position], descriptor)?;
        }
        self.publish(descriptors)
    }

    /// Puts an arbitrary head index in the available ring without owning any descriptor
    /// (for tests of out-of-range heads). Nothing is reclaimed if the device returns it.
    pub fn add_raw_avail_entry(&mut self, head: u16) -> Result<(), Error> {
        self.write_avail_entry(head)
    }

    /// Signals the kick eventfd, unless EVENT_IDX is on and the device said (through
    /// avail_event) that it is still processing and will look at the ring again anyway.
    pub fn notify(&self) -> Result<(), Error> {
        // The device must see the index update before it sees the kick, and we must read
        // avail_event only after publishing the index (the device re-checks in the other order).
        fence(Ordering::SeqCst);
        if self.event_idx {
            let previous = self.avail_at_last_notify.replace(self.next_avail);
            let avail_event: u16 = self.ram.memory().load(
                self.used_ring
                    .unchecked_add(USED_RING_OFFSET + USED_ELEMENT_SIZE * u64::from(self.size)),
                Ordering::Acquire,
            )?;
            if !need_event(avail_event, self.next_avail, previous) {
                return Ok(());
            }
        }
        self.kicks_sent.set(self.kicks_sent.get() + 1);
        self.kick.write(1).map_err(Error::EventFd)
    }

    /// Tells the device (EVENT_IDX) to signal once it returns the next element, i.e. when
    /// the used index moves past what we have consumed.
    fn arm_used_event(&self) -> Result<(), Error> {
        self.ram.memory().store(
            self.last_used,
            self.avail_ring
                .unchecked_add(AVAIL_RING_OFFSET + 2 * u64::from(self.size)),
            Ordering::Release,
        )?;
        // The used_event store must be visible before we re-read the used index.
        fence(Ordering::SeqCst);
        Ok(())
    }

    /// Takes the next element off the used ring, if the device returned one, and reclaims the
    /// descriptors of its chain.
    pub fn pop_used(&mut self) -> Result<Option<UsedElement>, Error> {
        let mem = self.ram.memory();
        let device_idx: u16 = mem.load(self.used_ring.unchecked_add(2), Ordering::Acquire)?;
        if device_idx == self.last_used {
            return Ok(None);
        }
        let slot = u64::from(self.last_used % self.size);
        let element_addr = self
            .used_ring
            .unchecked_add(USED_RING_OFFSET + slot * USED_ELEMENT_SIZE);
        let id: u32 = mem.read_obj(element_addr)?;
        let len: u32 = mem.read_obj(element_addr.unchecked_add(4))?;
        self.last_used = self.last_used.wrapping_add(1);
        let owned = usize::try_from(id)
            .ok()
            .and_then(|i| self.chains.get_mut(i))
            .filter(|chain| !chain.is_empty());
        let Some(chain) = owned else {
            return Err(Error::BadUsedElement {
                queue: self.index,
                head: id,
                len,
            });
        };
        self.free_descriptors.extend(chain.drain(..).rev());
        self.in_flight -= 1;
        // `id` indexes `chains`, whose length is a u16 queue size.
        let head = u16::try_from(id).unwrap_or(u16::MAX);
        Ok(Some(UsedElement { head, len }))
    }

    /// Waits up to `timeout` for the device to return an element.
    pub fn wait_used(&mut self, timeout: Duration) -> Result<UsedElement, Error> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(element) = self.pop_used()? {
                return Ok(element);
            }
            if self.event_idx {
                // Calls are suppressed while we are busy; ask for one before sleeping and
                // re-check, or an element added in between would never be signalled.
                self.arm_used_event()?;
                if let Some(element) = self.pop_used()? {
                    return Ok(element);
                }
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::Timeout {
                    queue: self.index,
                    waited: timeout,
                });
            }
            self.wait_for_call(deadline - now)?;
        }
    }

    /// Blocks until the call eventfd fires or `timeout` passes, then clears it.
    fn wait_for_call(&self, timeout: Duration) -> Result<(), Error> {
        let mut poll_fd = libc::pollfd {
            fd: self.call.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let millis = libc::c_int::try_from(timeout.as_millis().max(1)).unwrap_or(libc::c_int::MAX);
        // SAFETY: `poll_fd` is a valid pollfd array of length 1 for the duration of the call.
        let ready = unsafe { libc::poll(&mut poll_fd, 1, millis) };
        if ready < 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() != std::io::ErrorKind::Interrupted {
                return Err(Error::EventFd(err));
            }
        }
        if ready > 0 {
            // Non-blocking read: a concurrent reader can only be ourselves, so EAGAIN is benign.
            let _ = self.call.read();
        }
        Ok(())
    }

    /// Takes `count` free descriptors, in chain order. The list lives in the (empty) chain
    /// slot of its head, so that steady-state submission does not allocate.
    fn take_descriptors(&mut self, count: usize) -> Result<Vec<u16>, Error> {
        if count > self.free_descriptors.len() {
            return Err(Error::QueueFull {
                queue: self.index,
                needed: count,
                free: self.free_descriptors.len(),
            });
        }
        let split = self.free_descriptors.len() - count;
        let head = self.free_descriptors[self.free_descriptors.len() - 1];
        let mut taken = std::mem::take(&mut self.chains[usize::from(head)]);
        taken.clear();
        taken.extend(self.free_descriptors.drain(split..).rev());
        Ok(taken)
    }

    fn publish(&mut self, descriptors: Vec<u16>) -> Result<u16, Error> {
        let head = descriptors[0];
        if let Err(err) = self.write_avail_entry(head) {
            self.free_descriptors.extend(descriptors.iter().rev());
            return Err(err);
        }
        self.chains[usize::from(head)] = descriptors;
        self.in_flight += 1;
        Ok(head)
    }

    fn write_avail_entry(&mut self, head: u16) -> Result<(), Error> {
        let mem = self.ram.memory();
        let slot = u64::from(self.next_avail % self.size);
        mem.write_obj(
            head,
            self.avail_ring.unchecked_add(AVAIL_RING_OFFSET + 2 * slot),
        )?;
        self.next_avail = self.next_avail.wrapping_add(1);
        // The Release store orders the descriptor and ring-entry writes before the new index.
        mem.store(
            self.next_avail,
            self.avail_ring.unchecked_add(2),
            Ordering::Release,
        )?;
        Ok(())
    }

    fn descriptor_address(&self, index: u16) -> GuestAddress {
        self.desc_table
            .unchecked_add(u64::from(index) * DESCRIPTOR_SIZE)
    }
}

/// The virtio `vring_need_event`: whether moving an index from `old` to `new` crossed
/// `event`, the index the other side asked to be told about.
fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::{Queue, QueueT};

    /// A device-side view of `driver`'s rings, using the virtio-queue crate backends use.
    fn device_queue(driver: &SplitQueue) -> Queue {
        let mut queue = Queue::new(driver.size()).unwrap();
        queue.set_size(driver.size());
        let split = |addr: GuestAddress| (Some(addr.0 as u32), Some((addr.0 >> 32) as u32));
        let (low, high) = split(driver.desc_table());
        queue.set_desc_table_address(low, high);
        let (low, high) = split(driver.avail_ring());
        queue.set_avail_ring_address(low, high);
        let (low, high) = split(driver.used_ring());
        queue.set_used_ring_address(low, high);
        queue.set_ready(true);
        queue
    }

    fn buffer(addr: u64, len: u32) -> Buffer {
        Buffer {
            addr: GuestAddress(addr),
            len,
        }
    }

    #[test]
    fn device_sees_chains_in_order_and_returns_them() {
        let ram = Arc::new(GuestRam::new(1 << 20).unwrap());
        let mut driver = SplitQueue::new(ram.clone(), 1, 16).unwrap();
        let mut device = device_queue(&driver);
        let first = driver
            .add_chain(
                &[buffer(0x8000, 10)],
                &[buffer(0x9000, 20), buffer(0xa000, 30)],
            )
            .unwrap();
        let second = driver.add_chain(&[buffer(0xb000, 40)], &[]).unwrap();
        assert_eq!(driver.in_flight(), 2);
        assert_eq!(driver.free_descriptors(), 12);

        let mem = ram.memory();
        let chain = device.pop_descriptor_chain(mem).expect("first chain");
        assert_eq!(chain.head_index(), first);
        let seen: Vec<(u64, u32, bool)> = chain
            .map(|d| (d.addr().0, d.len(), d.is_write_only()))
            .collect();
        assert_eq!(
            seen,
            vec![(0x8000, 10, false), (0x9000, 20, true), (0xa000, 30, true)]
        );
        let chain = device.pop_descriptor_chain(mem).expect("second chain");
        assert_eq!(chain.head_index(), second);
        assert!(device.pop_descriptor_chain(mem).is_none());

        device.add_used(mem, second, 0).unwrap();
        device.add_used(mem, first, 25).unwrap();
        assert_eq!(
            driver.pop_used().unwrap(),
            Some(UsedElement {
                head: second,
                len: 0
            })
        );
        assert_eq!(
            driver.pop_used().unwrap(),
            Some(UsedElement {
                head: first,
                len: 25
            })
        );
        assert_eq!(driver.pop_used().unwrap(), None);
        assert_eq!(driver.in_flight(), 0);
        assert_eq!(driver.free_descriptors(), 16);
    }

    #[test]
    fn ring_wraps_around_many_times() {
        let ram = Arc::new(GuestRam::new(1 << 20).unwrap());
        let mut driver = SplitQueue::new(ram.clone(), 1, 4).unwrap();
        let mut device = device_queue(&driver);
        let mem = ram.memory();
        for round in 0..50u32 {
            let head = driver
                .add_chain(&[buffer(0x8000, round + 1)], &[buffer(0x9000, 8)])
                .unwrap();
            let chain = device.pop_descriptor_chain(mem).expect("chain");
            assert_eq!(chain.head_index(), head);
            let first = chain.clone().next().unwrap();
            assert_eq!(first.len(), round + 1);
            device.add_used(mem, head, round).unwrap();
            let used = driver.pop_used().unwrap().expect("used element");
            assert_eq!(used, UsedElement { head, len: round });
        }
        assert_eq!(driver.free_descriptors(), 4);
    }

    #[test]
    fn full_queue_is_reported_not_overrun() {
        let ram = Arc::new(GuestRam::new(1 << 20).unwrap());
        let mut driver = SplitQueue::new(ram, 1, 4).unwrap();
        driver
            .add_chain(
                &[buffer(0x8000, 1)],
                &[buffer(0x9000, 1), buffer(0xa000, 1)],
            )
            .unwrap();
        let err = driver
            .add_chain(&[buffer(0x8000, 1)], &[buffer(0x9000, 1)])
            .unwrap_err();
        assert!(
            matches!(
                err,
                Error::QueueFull {
                    needed: 2,
                    free: 1,
                    ..
                }
            ),
            "{err}"
        );
        assert_eq!(driver.free_descriptors(), 1);
    }

    #[test]
    fn used_element_not_in_flight_is_an_error() {
        let ram = Arc::new(GuestRam::new(1 << 20).unwrap());
        let mut driver = SplitQueue::new(ram.clone(), 1, 8).unwrap();
        let mut device = device_queue(&driver);
        device.add_used(ram.memory(), 5, 1).unwrap();
        assert!(matches!(
            driver.pop_used(),
            Err(Error::BadUsedElement { head: 5, .. })
        ));
    }

    #[test]
    fn wait_used_times_out_without_device() {
        let ram = Arc::new(GuestRam::new(1 << 20).unwrap());
        let mut driver = SplitQueue::new(ram, 3, 8).unwrap();
        let started = Instant::now();
        let err = driver.wait_used(Duration::from_millis(50)).unwrap_err();
        assert!(matches!(err, Error::Timeout { queue: 3, .. }), "{err}");
        assert!(started.elapsed() >= Duration::from_millis(50));
    }

    #[test]
    fn need_event_matches_the_virtio_definition() {
        assert!(need_event(0, 1, 0), "crossing the requested index");
        assert!(!need_event(0, 2, 1), "already past the requested index");
        assert!(
            need_event(5, 9, 3),
            "the requested index lies inside the moved range"
        );
        assert!(!need_event(10, 9, 3), "the requested index is ahead");
        assert!(need_event(u16::MAX, 1, u16::MAX - 1), "wrapping");
    }

    #[test]
    fn event_idx_suppresses_kicks_until_the_device_asks() {
        let ram = Arc::new(GuestRam::new(1 << 20).unwrap());
        let mut driver = SplitQueue::new(ram.clone(), 1, 8).unwrap();
        driver.set_event_idx(true);
        let mut device = device_queue(&driver);
        device.set_event_idx(true);
        let mem = ram.memory();
        driver.add_chain(&[buffer(0x8000, 1)], &[]).unwrap();
        driver.notify().unwrap();
        assert_eq!(driver.kicks_sent(), 1, "the first request is kicked");
        driver.add_chain(&[buffer(0x8000, 1)], &[]).unwrap();
        driver.notify().unwrap();
        assert_eq!(
            driver.kicks_sent(),
            1,
            "the device has not consumed the first kick: no second kick"
        );
        assert!(driver.kick_fd().read().is_ok(), "one kick is pending");
        while device.pop_descriptor_chain(mem).is_some() {}
        // The device is done and asks to be kicked for the next request.
        assert!(!device.enable_notification(mem).unwrap());
        driver.add_chain(&[buffer(0x8000, 1)], &[]).unwrap();
        driver.notify().unwrap();
        assert_eq!(driver.kicks_sent(), 2);
    }

    #[test]
    fn event_idx_wait_arms_used_event() {
        let ram = Arc::new(GuestRam::new(1 << 20).unwrap());
        let mut driver = SplitQueue::new(ram.clone(), 1, 8).unwrap();
        driver.set_event_idx(true);
        let mut device = device_queue(&driver);
        device.set_event_idx(true);
        let mem = ram.memory();
        let head = driver.add_chain(&[buffer(0x8000, 1)], &[]).unwrap();
        let _ = device.pop_descriptor_chain(mem).unwrap();
        // Nothing is used yet: waiting arms used_event at our consumed index (0) and times out.
        assert!(driver.wait_used(Duration::from_millis(10)).is_err());
        device.add_used(mem, head, 3).unwrap();
        assert!(
            device.needs_notification(mem).unwrap(),
            "the driver asked to be told about the next used element"
        );
        assert_eq!(
            driver.wait_used(Duration::from_millis(10)).unwrap(),
            UsedElement { head, len: 3 }
        );
    }

    #[test]
    fn raw_chain_is_written_verbatim() {
        let ram = Arc::new(GuestRam::new(1 << 20).unwrap());
        let mut driver = SplitQueue::new(ram.clone(), 1, 8).unwrap();
        let head = driver
            .add_raw_chain(&[
                RawDescriptor {
                    addr: 0x8000,
                    len: 7,
                    flags: VIRTQ_DESC_F_NEXT,
                    next: RawNext::Following,
                },
                RawDescriptor {
                    addr: u64::MAX - 3,
                    len: 9,
                    flags: VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT,
                    next: RawNext::ChainPosition(0),
                },
            ])
            .unwrap();
        let mem = ram.memory();
        let first: Descriptor = mem.read_obj(driver.descriptor_address(head)).unwrap();
        let second: Descriptor = mem.read_obj(driver.descriptor_address(first.next)).unwrap();
        assert_eq!((first.addr, first.len), (0x8000, 7));
        assert_eq!(second.addr, u64::MAX - 3);
        assert_eq!(second.flags, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT);
        assert_eq!(second.next, head, "the loop points back to the head");
    }
}
