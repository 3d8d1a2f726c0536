//! A minimal vhost-user-blk frontend: the VMM and guest driver side of virtio-blk.
//!
//! [`VhostUserBlk`] connects to a backend socket, negotiates the virtio-blk features, reads
//! the configuration space and starts N request queues. Each [`BlkQueue`] sends one request
//! at a time over one split virtqueue, its data cut into descriptors of at most
//! [`BlkDeviceConfig::segment_size`] bytes (so the backend sees multi-descriptor chains), and
//! can publish hand-crafted chains for malformed-input tests.

use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserProtocolFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::VhostBackend;
use vm_memory::{Bytes, GuestAddress};

use crate::device::{
    VHOST_USER_F_PROTOCOL_FEATURES, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
};
use crate::memory::GuestRam;
use crate::virtqueue::{Buffer, RawDescriptor, SplitQueue, UsedElement};
use crate::Error;

/// virtio-blk feature bits (virtio 1.2, 5.2.3).
pub mod features {
    pub const SEG_MAX: u64 = 1 << 2;
    pub const RO: u64 = 1 << 5;
    pub const BLK_SIZE: u64 = 1 << 6;
    pub const FLUSH: u64 = 1 << 9;
    pub const MQ: u64 = 1 << 12;
    pub const DISCARD: u64 = 1 << 13;
    pub const WRITE_ZEROES: u64 = 1 << 14;
    /// Everything above that the frontend acknowledges when offered.
    pub const ALL: u64 = SEG_MAX | RO | BLK_SIZE | FLUSH | MQ | DISCARD | WRITE_ZEROES;
}

/// Request types (virtio 1.2, 5.2.6).
pub mod request_type {
    pub const IN: u32 = 0;
    pub const OUT: u32 = 1;
    pub const FLUSH: u32 = 4;
    pub const GET_ID: u32 = 8;
    pub const GET_LIFETIME: u32 = 10;
    pub const DISCARD: u32 = 11;
    pub const WRITE_ZEROES: u32 = 13;
}

/// Status byte values.
pub mod status {
    pub const OK: u8 = 0;
    pub const IOERR: u8 = 1;
    pub const UNSUPP: u8 = 2;
}

/// The WRITE_ZEROES segment flag that lets the device deallocate.
pub const RANGE_FLAG_UNMAP: u32 = 1;
/// Sectors are 512 bytes.
pub const SECTOR_SIZE: u64 = 512;
/// Bytes of the configuration space read by default (up to the secure-erase fields).
pub const CONFIG_LEN: u32 = 72;
/// The shortest configuration space read: up to `write_zeroes_may_unmap` and its padding,
/// the size of `struct virtio_blk_config` before the secure-erase fields (QEMU 7.2's
/// backends refuse a longer GET_CONFIG).
pub const MIN_CONFIG_LEN: u32 = 60;

/// How the frontend sets up the device.
#[derive(Debug, Clone, Copy)]
pub struct BlkDeviceConfig {
    /// Size of guest RAM in bytes.
    pub memory_size: usize,
    /// Request queues to start (needs VIRTIO_BLK_F_MQ above 1).
    pub queues: u16,
    /// Descriptors per queue.
    pub queue_size: u16,
    /// Largest data a request carries, per queue.
    pub max_data: u32,
    /// Data is cut into descriptors of at most this many bytes.
    pub segment_size: u32,
    /// Negotiate VIRTIO_RING_F_EVENT_IDX when offered.
    pub event_idx: bool,
    /// Timeout on every vhost-user message and every request.
    pub timeout: Duration,
    /// Bytes of the configuration space GET_CONFIG asks for, from [`MIN_CONFIG_LEN`] to
    /// [`CONFIG_LEN`]: a backend may refuse more than its `struct virtio_blk_config` holds.
    pub config_len: u32,
}

impl Default for BlkDeviceConfig {
    fn default() -> Self {
        Self {
            memory_size: 64 << 20,
            queues: 1,
            queue_size: 128,
            max_data: 1 << 20,
            segment_size: 64 << 10,
            event_idx: true,
            timeout: Duration::from_secs(10),
            config_len: CONFIG_LEN,
        }
    }
}

/// The virtio-blk configuration space fields the tests look at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BlkConfig {
    pub capacity: u64,
    pub seg_max: u32,
    pub blk_size: u32,
    pub num_queues: u16,
    pub max_discard_sectors: u32,
    pub max_discard_seg: u32,
    pub discard_sector_alignment: u32,
    pub max_write_zeroes_sectors: u32,
    pub max_write_zeroes_seg: u32,
    pub write_zeroes_may_unmap: u8,
}

impl BlkConfig {
    fn parse(bytes: &[u8]) -> Self {
        let u16_at = |o: usize| u16::from_le_bytes([bytes[o], bytes[o + 1]]);
        let u32_at =
            |o: usize| u32::from_le_bytes([bytes[o], bytes[o + 1], bytes[o + 2], bytes[o + 3]]);
        let mut capacity = [0u8; 8];
        capacity.copy_from_slice(&bytes[0..8]);
        Self {
            capacity: u64::from_le_bytes(capacity),
            seg_max: u32_at(12),
            blk_size: u32_at(20),
            num_queues: u16_at(34),
            max_discard_sectors: u32_at(36),
            max_discard_seg: u32_at(40),
            discard_sector_alignment: u32_at(44),
            max_write_zeroes_sectors: u32_at(48),
            max_write_zeroes_seg: u32_at(52),
            write_zeroes_may_unmap: bytes[56],
        }
    }
}

/// A negotiated vhost-user-blk device with its queues ready to use.
pub struct VhostUserBlk {
    frontend: Frontend,
    ram: Arc<GuestRam>,
    offered_features: u64,
    acked_features: u64,
    backend_queues: u64,
    config: BlkConfig,
    queues: Vec<Option<BlkQueue>>,
}

impl VhostUserBlk {
    /// Connects to a backend listening on `path`, retrying until `connect_timeout` passes.
    pub fn connect(
        path: impl AsRef<Path>,
        config: BlkDeviceConfig,
        connect_timeout: Duration,
    ) -> Result<Self, Error> {
        let stream = crate::device::connect_retrying(path.as_ref(), connect_timeout)?;
        Self::from_stream(stream, config)
    }

    /// Sets the device up over an already connected socket.
    pub fn from_stream(stream: UnixStream, config: BlkDeviceConfig) -> Result<Self, Error> {
        stream
            .set_read_timeout(Some(config.timeout))
            .and_then(|_| stream.set_write_timeout(Some(config.timeout)))
            .map_err(Error::Socket)?;
        if config.queues == 0 || config.segment_size == 0 {
            return Err(Error::InvalidConfig(
                "a blk device needs a queue and a non-zero segment size".into(),
            ));
        }
        if !(MIN_CONFIG_LEN..=CONFIG_LEN).contains(&config.config_len) {
            return Err(Error::InvalidConfig(format!(
                "the configuration space length {} is not from {MIN_CONFIG_LEN} to {CONFIG_LEN}",
                config.config_len
            )));
        }
        let ram = Arc::new(GuestRam::new(config.memory_size)?);
        let total_queues = u64::from(config.queues);
        let mut frontend = Frontend::from_stream(stream, total_queues);
        frontend.set_owner()?;
        let offered_features = frontend.get_features()?;
        for (bit, name) in [
            (VIRTIO_F_VERSION_1, "VIRTIO_F_VERSION_1"),
            (
                VHOST_USER_F_PROTOCOL_FEATURES,
                "VHOST_USER_F_PROTOCOL_FEATURES",
            ),
        ] {
            if offered_features & bit == 0 {
                return Err(Error::Negotiation(format!(
                    "backend does not offer {name} (features {offered_features:#x})"
                )));
            }
        }
        let event_idx = config.event_idx && offered_features & VIRTIO_RING_F_EVENT_IDX != 0;
        let mut acked_features = VIRTIO_F_VERSION_1
            | VHOST_USER_F_PROTOCOL_FEATURES
            | (offered_features & (VIRTIO_RING_F_INDIRECT_DESC | features::ALL));
        if event_idx {
            acked_features |= VIRTIO_RING_F_EVENT_IDX;
        }
        let offered_protocol = frontend.get_protocol_features()?;
        let wanted = VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIG;
        let acked_protocol = offered_protocol & wanted;
        if !acked_protocol.contains(VhostUserProtocolFeatures::CONFIG) {
            // QEMU's vhost-user-blk refuses such a backend too.
            return Err(Error::Negotiation(
                "backend does not offer VHOST_USER_PROTOCOL_F_CONFIG".into(),
            ));
        }
        frontend.set_protocol_features(acked_protocol)?;
        let backend_queues = if acked_protocol.contains(VhostUserProtocolFeatures::MQ) {
            frontend.get_queue_num()?
        } else {
            1
        };
        if backend_queues < total_queues {
            return Err(Error::NotEnoughQueues {
                wanted: total_queues,
                offered: backend_queues,
            });
        }
        let config_len = config.config_len;
        let zeros = vec![0u8; config_len as usize];
        let (_, payload) =
            frontend.get_config(0, config_len, VhostUserConfigFlags::WRITABLE, &zeros)?;
        if payload.len() < config_len as usize {
            return Err(Error::Negotiation(format!(
                "the configuration space is {} bytes, not {config_len}",
                payload.len()
            )));
        }
        let blk_config = BlkConfig::parse(&payload);
        frontend.set_features(acked_features)?;
        if acked_protocol.contains(VhostUserProtocolFeatures::REPLY_ACK) {
            frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        }
        frontend.set_mem_table(&ram.region_infos()?)?;
        let mut queues = Vec::new();
        for index in 0..config.queues {
            let mut queue = BlkQueue::new(ram.clone(), index, &config)?;
            queue.vq.set_event_idx(event_idx);
            let vq = &queue.vq;
            let index = usize::from(index);
            frontend.set_vring_num(index, vq.size())?;
            frontend.set_vring_addr(index, &vq.config_data()?)?;
            frontend.set_vring_base(index, 0)?;
            frontend.set_vring_call(index, vq.call_fd())?;
            frontend.set_vring_kick(index, vq.kick_fd())?;
            frontend.set_vring_enable(index, true)?;
            queues.push(Some(queue));
        }
        Ok(Self {
            frontend,
            ram,
            offered_features,
            acked_features,
            backend_queues,
            config: blk_config,
            queues,
        })
    }

    /// Features the backend offered.
    pub fn offered_features(&self) -> u64 {
        self.offered_features
    }

    /// Features acknowledged.
    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }

    /// Queues the backend supports (GET_QUEUE_NUM).
    pub fn backend_queues(&self) -> u64 {
        self.backend_queues
    }

    /// The configuration space as read at setup.
    pub fn config(&self) -> &BlkConfig {
        &self.config
    }

    /// Guest memory shared by all queues.
    pub fn ram(&self) -> &Arc<GuestRam> {
        &self.ram
    }

    /// The vhost-user connection, for messages this driver does not wrap.
    pub fn frontend(&mut self) -> &mut Frontend {
        &mut self.frontend
    }

    /// Hands out queue `index` so a thread can own it; `None` if already taken.
    pub fn take_queue(&mut self, index: u16) -> Option<BlkQueue> {
        self.queues
            .get_mut(usize::from(index))
            .and_then(Option::take)
    }

    /// Closes the vhost-user connection.
    pub fn disconnect(self) {
        drop(self);
    }
}

/// What a request came back with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlkReply {
    /// The status byte.
    pub status: u8,
    /// The device-writable data before the status byte (reads, GET_ID).
    pub data: Vec<u8>,
    /// The length the device put in the used ring.
    pub used_len: u32,
}

/// A virtio-blk driver over one request queue.
pub struct BlkQueue {
    vq: SplitQueue,
    ram: Arc<GuestRam>,
    header: GuestAddress,
    status: GuestAddress,
    data: GuestAddress,
    max_data: u32,
    segment_size: u32,
    timeout: Duration,
}

impl BlkQueue {
    fn new(ram: Arc<GuestRam>, index: u16, config: &BlkDeviceConfig) -> Result<Self, Error> {
        let vq = SplitQueue::new(ram.clone(), index, config.queue_size)?;
        let header = ram.allocate(16, 4096)?;
        let status = ram.allocate(1, 16)?;
        let data = ram.allocate(u64::from(config.max_data.max(4096)), 4096)?;
        Ok(Self {
            vq,
            ram,
            header,
            status,
            data,
            max_data: config.max_data,
            segment_size: config.segment_size,
            timeout: config.timeout,
        })
    }

    /// The underlying virtqueue driver (for raw tests).
    pub fn virtqueue(&mut self) -> &mut SplitQueue {
        &mut self.vq
    }

    /// Guest memory.
    pub fn ram(&self) -> &Arc<GuestRam> {
        &self.ram
    }

    fn segments(&self, base: GuestAddress, len: u32) -> Vec<Buffer> {
        let mut buffers = Vec::new();
        let mut at = 0u32;
        while at < len {
            let piece = (len - at).min(self.segment_size);
            buffers.push(Buffer {
                addr: GuestAddress(base.0 + u64::from(at)),
                len: piece,
            });
            at += piece;
        }
        buffers
    }

    /// Sends a request: `out` after the header as device-readable data, `in_len` bytes of
    /// device-writable room before the status byte. Waits for the answer.
    pub fn request(
        &mut self,
        kind: u32,
        sector: u64,
        out: &[u8],
        in_len: u32,
    ) -> Result<BlkReply, Error> {
        let out_len = u32::try_from(out.len()).unwrap_or(u32::MAX);
        if out_len > self.max_data || in_len > self.max_data || (out_len > 0 && in_len > 0) {
            return Err(Error::InvalidRequest(format!(
                "{out_len} bytes out and {in_len} in do not fit a {}-byte data buffer",
                self.max_data
            )));
        }
        let mut header = [0u8; 16];
        header[0..4].copy_from_slice(&kind.to_le_bytes());
        header[8..16].copy_from_slice(&sector.to_le_bytes());
        let ram = self.ram.clone();
        let mem = ram.memory();
        mem.write_slice(&header, self.header)?;
        // A status the device must overwrite.
        mem.write_obj(0xffu8, self.status)?;
        mem.write_slice(out, self.data)?;
        let mut readable = vec![Buffer {
            addr: self.header,
            len: 16,
        }];
        readable.extend(self.segments(self.data, out_len));
        let mut writable = self.segments(self.data, in_len);
        writable.push(Buffer {
            addr: self.status,
            len: 1,
        });
        let head = self.vq.add_chain(&readable, &writable)?;
        self.vq.notify()?;
        let used = self.wait(head)?;
        let mut data = vec![0u8; in_len as usize];
        mem.read_slice(&mut data, self.data)?;
        let status: u8 = mem.read_obj(self.status)?;
        Ok(BlkReply {
            status,
            data,
            used_len: used.len,
        })
    }

    fn wait(&mut self, head: u16) -> Result<UsedElement, Error> {
        let used = self.vq.wait_used(self.timeout)?;
        if used.head != head {
            return Err(Error::BadUsedElement {
                queue: self.vq.index(),
                head: u32::from(used.head),
                len: used.len,
            });
        }
        Ok(used)
    }

    /// Reads `len` bytes at `sector`; the data when the status is OK, else the status.
    pub fn read(&mut self, sector: u64, len: u32) -> Result<Result<Vec<u8>, u8>, Error> {
        let reply = self.request(request_type::IN, sector, &[], len)?;
        Ok(match reply.status {
            status::OK => Ok(reply.data),
            other => Err(other),
        })
    }

    /// Writes `data` at `sector`; returns the status byte.
    pub fn write(&mut self, sector: u64, data: &[u8]) -> Result<u8, Error> {
        Ok(self.request(request_type::OUT, sector, data, 0)?.status)
    }

    /// FLUSH; returns the status byte.
    pub fn flush(&mut self) -> Result<u8, Error> {
        Ok(self.request(request_type::FLUSH, 0, &[], 0)?.status)
    }

    /// GET_ID: the status and the 20 serial bytes.
    pub fn get_id(&mut self) -> Result<(u8, Vec<u8>), Error> {
        let reply = self.request(request_type::GET_ID, 0, &[], 20)?;
        Ok((reply.status, reply.data))
    }

    /// The segment table of a DISCARD or WRITE_ZEROES: (sector, sectors, flags) each.
    pub fn range_table(ranges: &[(u64, u32, u32)]) -> Vec<u8> {
        let mut table = Vec::with_capacity(ranges.len() * 16);
        for (sector, sectors, flags) in ranges {
            table.extend_from_slice(&sector.to_le_bytes());
            table.extend_from_slice(&sectors.to_le_bytes());
            table.extend_from_slice(&flags.to_le_bytes());
        }
        table
    }

    /// DISCARD of the given segments; returns the status byte.
    pub fn discard(&mut self, ranges: &[(u64, u32, u32)]) -> Result<u8, Error> {
        let table = Self::range_table(ranges);
        Ok(self.request(request_type::DISCARD, 0, &table, 0)?.status)
    }

    /// WRITE_ZEROES of the given segments; returns the status byte.
    pub fn write_zeroes(&mut self, ranges: &[(u64, u32, u32)]) -> Result<u8, Error> {
        let table = Self::range_table(ranges);
        Ok(self
            .request(request_type::WRITE_ZEROES, 0, &table, 0)?
            .status)
    }

    /// Allocates a scratch guest buffer for raw chains (never freed).
    pub fn allocate_raw_buffer(&self, len: u32) -> Result<GuestAddress, Error> {
        self.ram.allocate(u64::from(len.max(1)), 4096)
    }

    /// Publishes a hand-crafted chain, kicks the device and waits up to `timeout` for it to
    /// come back; `None` when it did not.
    pub fn raw(
        &mut self,
        chain: &[RawDescriptor],
        timeout: Duration,
    ) -> Result<Option<UsedElement>, Error> {
        let head = self.vq.add_raw_chain(chain)?;
        self.vq.notify()?;
        match self.vq.wait_used(timeout) {
            Ok(used) if used.head == head => Ok(Some(used)),
            Ok(used) => Err(Error::BadUsedElement {
                queue: self.vq.index(),
                head: u32::from(used.head),
                len: used.len,
            }),
            Err(Error::Timeout { .. }) => Ok(None),
            Err(err) => Err(err),
        }
    }
}
