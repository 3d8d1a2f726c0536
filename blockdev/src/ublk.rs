//! The ublk server: exports a [`BlockTarget`] as `/dev/ublkbN` through the kernel's ublk
//! driver (libublk 0.4.8), one thread per queue, the target's data moved with io_uring
//! on the queue's own ring.
//!
//! # Transports
//! - **zero-copy** (`UBLK_F_AUTO_BUF_REG`, Linux ≥ 6.16): the kernel registers each
//!   request's pages in the queue ring's buffer table at index = tag before handing the
//!   request over; data moves with `READ_FIXED`/`WRITE_FIXED` between the backing file and
//!   those pages, never through berth's memory. Registration can fail for one request
//!   (`UBLK_AUTO_BUF_REG_FALLBACK` is set, so the kernel then flags it
//!   `UBLK_IO_F_NEED_REG_BUF`): berth registers that buffer itself with
//!   `UBLK_U_IO_REGISTER_IO_BUF`, moves the data and unregisters it.
//! - **user-copy** (`UBLK_F_USER_COPY`, ≥ 6.5): berth reads or writes the request's data
//!   through the ublk char device at the request's position, into its own buffer.
//! - **copy**: the kernel copies each request into a per-tag buffer berth registered.
//!
//! Zeros (a discarded overlay cluster, the tail past an image) are read from
//! `/dev/zero` into the request in zero-copy mode. Metadata work — an image fetching
//! chunks, an overlay allocating clusters — runs on the queue thread. A FLUSH or FUA write
//! the target finishes on another thread ([`Progress::Pending`]) is awaited on the ring
//! (a read of the completion's eventfd) while the queue serves its other requests.
//!
//! # Recovery
//! Devices are created with `UBLK_F_USER_RECOVERY | UBLK_F_USER_RECOVERY_REISSUE`: if the
//! server dies the kernel keeps `/dev/ublkbN` and holds its requests; a new server started
//! with [`ServeMode::Recover`] reopens the target from the device's stored
//! description and the held requests are reissued to it.

use std::cell::RefCell;
use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use io_uring::{opcode, types};
use libublk::ctrl::{UblkCtrl, UblkCtrlBuilder};
use libublk::helpers::IoBuf;
use libublk::io::{UblkDev, UblkIOCtx, UblkQueue};
use libublk::uring_async::ublk_submit_sqe_async;
use libublk::{sys, BufDesc, UblkError, UblkFlags, UblkUringData};

use crate::error::{BlockError, Result};
use crate::metrics::DeviceMetrics;
use crate::target::{validate, Extent, Op, Progress, ReadMapping, SharedTarget, Source};

/// Entries of a control ring set up ahead of time (libublk's own default).
const CONTROL_RING_DEPTH: u32 = 16;

/// How request data moves between the kernel and berth.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    ZeroCopy,
    UserCopy,
    Copy,
}

impl Transport {
    /// The name used on the command line and in metrics.
    pub fn name(self) -> &'static str {
        match self {
            Transport::ZeroCopy => "zero-copy",
            Transport::UserCopy => "user-copy",
            Transport::Copy => "copy",
        }
    }

    /// Parses a name given by [`Transport::name`].
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "zero-copy" => Some(Transport::ZeroCopy),
            "user-copy" => Some(Transport::UserCopy),
            "copy" => Some(Transport::Copy),
            _ => None,
        }
    }

    fn ctrl_flags(self) -> u64 {
        match self {
            // SUPPORT_ZERO_COPY too: without it the kernel refuses the manual
            // UBLK_U_IO_REGISTER_IO_BUF that the NEED_REG_BUF fallback needs.
            Transport::ZeroCopy => {
                (sys::UBLK_F_AUTO_BUF_REG | sys::UBLK_F_SUPPORT_ZERO_COPY) as u64
            }
            Transport::UserCopy => sys::UBLK_F_USER_COPY as u64,
            Transport::Copy => 0,
        }
    }
}

/// The ublk driver's feature bits (`UBLK_U_CMD_GET_FEATURES`), or `None` when the driver
/// is not loaded or too old to answer.
pub fn driver_features() -> Option<u64> {
    UblkCtrl::get_features()
}

/// Picks the transport: `wanted` when the driver offers it, else the best it offers.
/// An explicit choice the driver lacks is an error, never a silent downgrade.
pub fn choose_transport(wanted: Option<Transport>, features: u64) -> Result<Transport> {
    let has = |flag: u32| features & u64::from(flag) != 0;
    let offered = |t: Transport| match t {
        Transport::ZeroCopy => has(sys::UBLK_F_AUTO_BUF_REG) && has(sys::UBLK_F_SUPPORT_ZERO_COPY),
        Transport::UserCopy => has(sys::UBLK_F_USER_COPY),
        Transport::Copy => true,
    };
    match wanted {
        Some(t) if offered(t) => Ok(t),
        Some(t) => Err(BlockError::UblkSetup(format!(
            "the ublk driver does not offer the {} transport (features {features:#x}; zero-copy needs UBLK_F_AUTO_BUF_REG, Linux 6.16 or later; user-copy needs UBLK_F_USER_COPY, Linux 6.5 or later)",
            t.name()
        ))),
        None => Ok([Transport::ZeroCopy, Transport::UserCopy]
            .into_iter()
            .find(|&t| offered(t))
            .unwrap_or(Transport::Copy)),
    }
}

/// Whether the driver can hold a device's requests across a server restart.
pub fn supports_recovery(features: u64) -> bool {
    features & u64::from(sys::UBLK_F_USER_RECOVERY) != 0
        && features & u64::from(sys::UBLK_F_USER_RECOVERY_REISSUE) != 0
}

/// Run by each queue thread once its ring is set up, before it serves anything: where the
/// binary confines the thread (drops capabilities, installs a seccomp filter). An error
/// stops the queue, and with it the device.
#[derive(Clone)]
pub struct QueueThreadSetup(pub Arc<dyn Fn(u16) -> std::result::Result<(), String> + Send + Sync>);

impl std::fmt::Debug for QueueThreadSetup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("QueueThreadSetup(..)")
    }
}

/// What to create.
#[derive(Debug, Clone)]
pub struct DeviceConfig {
    /// Device id to ask for (`-1`: any).
    pub id: i32,
    pub queues: u16,
    pub depth: u16,
    /// Largest request in bytes.
    pub max_io_bytes: u32,
    pub transport: Transport,
    /// Ask for USER_RECOVERY (with reissue of held requests).
    pub recovery: bool,
    /// Stored with the device (libublk's per-device JSON), so that `recover` can reopen
    /// the same target.
    pub description: serde_json::Value,
    /// Test hook: make the kernel's automatic buffer registration fail for odd tags, so
    /// that the per-I/O `UBLK_IO_F_NEED_REG_BUF` fallback is exercised.
    pub force_registration_fallback: bool,
    /// Confinement of the queue threads.
    pub queue_thread_setup: Option<QueueThreadSetup>,
}

/// Create a new device, or take over one whose server died.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServeMode {
    Add,
    Recover,
}

/// Counters of the zero-copy path.
#[derive(Debug, Default)]
pub struct UblkCounters {
    /// Requests whose buffer berth had to register itself (`UBLK_IO_F_NEED_REG_BUF`).
    pub manual_registrations: AtomicU64,
}

/// A started device, as reported to the caller of [`serve`].
#[derive(Debug, Clone)]
pub struct Started {
    pub id: u32,
    pub block_device: String,
    pub transport: Transport,
}

/// The stored description of device `id`, as [`DeviceConfig::description`] gave it.
pub fn stored_description(id: u32) -> Result<serde_json::Value> {
    let ctrl = UblkCtrl::new_simple(id as i32).map_err(|source| BlockError::Ublk {
        context: format!("opening the control of ublk device {id}"),
        source,
    })?;
    ctrl.get_target_data_from_json()
        .and_then(|v| v.get("berth").cloned())
        .ok_or_else(|| {
            BlockError::UblkSetup(format!(
                "ublk device {id} has no berth description (not created by berth, or its file under {} is gone)",
                UblkCtrl::run_dir()
            ))
        })
}

/// Stops and deletes device `id` (served by this or another process).
pub fn delete_device(id: u32) -> Result<()> {
    let ctrl = UblkCtrl::new_simple(id as i32).map_err(|source| BlockError::Ublk {
        context: format!("opening the control of ublk device {id}"),
        source,
    })?;
    ctrl.del_dev().map_err(|source| BlockError::Ublk {
        context: format!("deleting ublk device {id}"),
        source,
    })?;
    Ok(())
}

/// Stops a running device from another thread of the serving process (the one that waits
/// for SIGTERM), made ready while that thread may still open files and set up rings, so
/// that stopping later takes nothing but submissions to a ring it already has: the device's
/// control handle comes from [`DeviceStopper::open`], on any thread; the stopping thread
/// calls [`prepare_control_ring`] once, before it confines itself.
pub struct DeviceStopper {
    id: u32,
    ctrl: UblkCtrl,
}

impl DeviceStopper {
    /// Opens the control of device `id` (on the calling thread's control ring).
    pub fn open(id: u32) -> Result<Self> {
        let ctrl = UblkCtrl::new_simple(id as i32)
            .map_err(ublk_err(format!("opening the control of ublk device {id}")))?;
        Ok(DeviceStopper { id, ctrl })
    }

    /// The device's id.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// Stops the device (its queues end, its server deletes it), through the calling
    /// thread's control ring: one [`prepare_control_ring`] set up, or one set up now.
    pub fn stop(&self) -> Result<()> {
        // Nothing to do when the ring is there; otherwise the ring is set up now.
        prepare_control_ring()?;
        self.ctrl
            .kill_dev()
            .map(drop)
            .map_err(ublk_err(format!("stopping ublk device {}", self.id)))
    }
}

/// Sets up the calling thread's ublk control ring (what libublk would set up on the
/// thread's first control command), so that a thread about to confine itself can later
/// send control commands with io_uring_enter alone.
pub fn prepare_control_ring() -> Result<()> {
    libublk::ctrl::ublk_init_ctrl_task_ring(|ring| {
        if ring.is_none() {
            *ring = Some(
                io_uring::IoUring::<io_uring::squeue::Entry128>::builder()
                    .build(CONTROL_RING_DEPTH)
                    .map_err(UblkError::IOError)?,
            );
        }
        Ok(())
    })
    .map_err(ublk_err("setting up a ublk control ring"))
}

/// Ids of the ublk devices that exist.
pub fn device_ids() -> Vec<u32> {
    let ids = Rc::new(RefCell::new(Vec::new()));
    let sink = ids.clone();
    UblkCtrl::for_each_dev_id(move |id| sink.borrow_mut().push(id));
    let mut ids = ids.borrow().clone();
    ids.sort_unstable();
    ids
}

/// State of device `id` as the driver reports it (`LIVE`, `QUIESCED`, `DEAD`, …), with
/// its server's pid.
pub fn device_state(id: u32) -> Result<(String, i32)> {
    let ctrl = UblkCtrl::new_simple(id as i32).map_err(|source| BlockError::Ublk {
        context: format!("opening the control of ublk device {id}"),
        source,
    })?;
    let info = ctrl.dev_info();
    let state = match u32::from(info.state) {
        sys::UBLK_S_DEV_DEAD => "dead",
        sys::UBLK_S_DEV_LIVE => "live",
        sys::UBLK_S_DEV_QUIESCED => "quiesced",
        sys::UBLK_S_DEV_FAIL_IO => "failing-io",
        _ => "unknown",
    };
    Ok((state.to_string(), info.ublksrv_pid))
}

fn ublk_err(context: impl Into<String>) -> impl FnOnce(UblkError) -> BlockError {
    let context = context.into();
    move |source| BlockError::Ublk { context, source }
}

/// Per-queue-thread resources.
struct QueueCtx {
    target: SharedTarget,
    metrics: Arc<DeviceMetrics>,
    counters: Arc<UblkCounters>,
    transport: Transport,
    /// `/dev/zero`, the source of zeros in zero-copy mode.
    zero: RawFd,
    max_io: usize,
}

/// Creates (or recovers) the device and serves it until it is deleted or stopped;
/// `started` is called once `/dev/ublkbN` exists.
pub fn serve(
    config: &DeviceConfig,
    mode: ServeMode,
    target: SharedTarget,
    metrics: Arc<DeviceMetrics>,
    counters: Arc<UblkCounters>,
    started: impl FnOnce(&Started) + Send + Sync + 'static,
) -> Result<()> {
    let info = target.info().clone();
    let mut ctrl_flags = config.transport.ctrl_flags();
    if config.recovery {
        ctrl_flags |= (sys::UBLK_F_USER_RECOVERY | sys::UBLK_F_USER_RECOVERY_REISSUE) as u64;
    }
    let dev_flags = match mode {
        ServeMode::Add => UblkFlags::UBLK_DEV_F_ADD_DEV,
        ServeMode::Recover => UblkFlags::UBLK_DEV_F_RECOVER_DEV,
    };
    let ctrl = UblkCtrlBuilder::default()
        .name("berth")
        .id(config.id)
        .nr_queues(config.queues)
        .depth(config.depth)
        .io_buf_bytes(config.max_io_bytes)
        .ctrl_flags(ctrl_flags)
        .dev_flags(dev_flags)
        .build()
        .map_err(ublk_err(match mode {
            ServeMode::Add => {
                "adding a device (is the ublk_drv module loaded, and are we root?)".to_string()
            }
            ServeMode::Recover => format!("recovering device {}", config.id),
        }))?;
    if mode == ServeMode::Recover {
        let features = ctrl.dev_info().flags;
        let transport_flags = (sys::UBLK_F_AUTO_BUF_REG
            | sys::UBLK_F_SUPPORT_ZERO_COPY
            | sys::UBLK_F_USER_COPY) as u64;
        if features & transport_flags != config.transport.ctrl_flags() {
            return Err(BlockError::UblkSetup(format!(
                "device {} was created with flags {features:#x}, not for the {} transport",
                config.id,
                config.transport.name()
            )));
        }
        ctrl.start_user_recover().map_err(ublk_err(format!(
            "starting the recovery of device {} (is its old server still running?)",
            config.id
        )))?;
    }
    metrics.set_transport(config.transport.name());

    let description = config.description.clone();
    let depth = config.depth;
    let max_io = config.max_io_bytes;
    let block_shift = info.block_size.trailing_zeros() as u8;
    let fds: Vec<RawFd> = Vec::new();
    let tgt_init = move |dev: &mut UblkDev| -> std::result::Result<(), UblkError> {
        let tgt = &mut dev.tgt;
        for fd in &fds {
            tgt.fds[tgt.nr_fds as usize] = *fd;
            tgt.nr_fds += 1;
        }
        tgt.dev_size = info.size;
        // Several target operations per request can be in flight.
        tgt.sq_depth = depth.saturating_mul(4).max(64);
        tgt.cq_depth = depth.saturating_mul(4).max(64);
        let mut attrs = sys::UBLK_ATTR_VOLATILE_CACHE | sys::UBLK_ATTR_FUA;
        if info.read_only {
            attrs |= sys::UBLK_ATTR_READ_ONLY;
        }
        let mut types = sys::UBLK_PARAM_TYPE_BASIC;
        let mut discard = sys::ublk_param_discard::default();
        if info.discard || info.write_zeroes {
            types |= sys::UBLK_PARAM_TYPE_DISCARD;
            discard.discard_granularity = info.block_size;
            discard.max_discard_segments = 1;
            if info.discard {
                discard.max_discard_sectors = u32::MAX >> 9;
            }
            if info.write_zeroes {
                discard.max_write_zeroes_sectors = u32::MAX >> 9;
            }
        }
        tgt.params = sys::ublk_params {
            types,
            basic: sys::ublk_param_basic {
                attrs,
                logical_bs_shift: block_shift,
                physical_bs_shift: block_shift.max(12),
                io_opt_shift: 12,
                io_min_shift: block_shift,
                max_sectors: max_io >> 9,
                dev_sectors: info.size >> 9,
                ..Default::default()
            },
            discard,
            ..Default::default()
        };
        dev.set_target_json(serde_json::json!({ "berth": description }));
        Ok(())
    };

    let zero = File::open("/dev/zero").map_err(|source| BlockError::Io {
        context: "opening /dev/zero".into(),
        source,
    })?;
    let zero_fd = zero.as_raw_fd();
    let transport = config.transport;
    let force_fallback = config.force_registration_fallback;
    let setup = config.queue_thread_setup.clone();
    let queue_target = target.clone();
    let q_fn = move |qid: u16, dev: &UblkDev| {
        let ctx = Rc::new(QueueCtx {
            target: queue_target.clone(),
            metrics: metrics.clone(),
            counters: counters.clone(),
            transport,
            zero: zero_fd,
            max_io: dev.dev_info.max_io_buf_bytes as usize,
        });
        serve_queue(qid, dev, ctx, force_fallback, setup.clone());
    };
    let device_started = move |ctrl: &UblkCtrl| {
        let info = ctrl.dev_info();
        started(&Started {
            id: info.dev_id,
            block_device: ctrl.get_bdev_path(),
            transport,
        });
    };
    let result = ctrl.run_target(tgt_init, q_fn, device_started);
    drop(zero);
    result.map(|_| ()).map_err(ublk_err("serving the device"))
}

fn serve_queue(
    qid: u16,
    dev: &UblkDev,
    ctx: Rc<QueueCtx>,
    force_fallback: bool,
    setup: Option<QueueThreadSetup>,
) {
    let queue = match UblkQueue::new(qid, dev) {
        Ok(q) => Rc::new(q),
        Err(err) => {
            tracing::error!(queue = qid, "cannot set up the ublk queue: {err}");
            return;
        }
    };
    if let Some(QueueThreadSetup(setup)) = &setup {
        if let Err(err) = setup(qid) {
            tracing::error!(queue = qid, "cannot confine the ublk queue thread: {err}");
            return;
        }
    }
    let executor = Rc::new(smol::LocalExecutor::new());
    let mut tasks = Vec::new();
    for tag in queue.tags() {
        let q = queue.clone();
        let ctx = ctx.clone();
        tasks.push(executor.spawn(async move {
            match io_task(&q, tag, &ctx, force_fallback).await {
                Err(UblkError::QueueIsDown) | Ok(()) => {}
                Err(err) => tracing::error!(queue = qid, tag, "ublk I/O task failed: {err}"),
            }
        }));
    }
    let run = executor.clone();
    // A plain parking block_on: no I/O reactor (and no reactor thread) is needed, the
    // queue waits in io_uring_enter.
    smol::future::block_on(executor.run(async move {
        let run_ops = || while run.try_tick() {};
        let done = || tasks.iter().all(|t| t.is_finished());
        if let Err(err) = libublk::wait_and_handle_io_events(&queue, Some(20), run_ops, done).await
        {
            if !matches!(err, UblkError::QueueIsDown) {
                tracing::error!(queue = qid, "ublk queue loop failed: {err}");
            }
        }
    }));
}

fn auto_reg(tag: u16, force_fallback: bool) -> sys::ublk_auto_buf_reg {
    // An index past the ring's buffer table makes the kernel's registration fail; with
    // the fallback flag the request then arrives flagged NEED_REG_BUF.
    let index = if force_fallback && tag % 2 == 1 {
        u16::MAX
    } else {
        tag
    };
    sys::ublk_auto_buf_reg {
        index,
        flags: sys::UBLK_AUTO_BUF_REG_FALLBACK as u8,
        ..Default::default()
    }
}

async fn io_task(
    q: &UblkQueue<'_>,
    tag: u16,
    ctx: &QueueCtx,
    force_fallback: bool,
) -> std::result::Result<(), UblkError> {
    let reg = auto_reg(tag, force_fallback);
    // Copy mode: the kernel fills and drains this buffer. User-copy: berth's own bounce
    // buffer, unknown to the kernel. Zero-copy: none.
    let buf = match ctx.transport {
        Transport::ZeroCopy => None,
        _ => Some(IoBuf::<u8>::new(ctx.max_io)),
    };
    match (ctx.transport, &buf) {
        (Transport::Copy, Some(b)) => {
            q.submit_io_prep_cmd(tag, BufDesc::Slice(b.as_slice()), 0, Some(b))
                .await?
        }
        (Transport::ZeroCopy, _) => {
            q.submit_io_prep_cmd(tag, BufDesc::AutoReg(reg), 0, None)
                .await?
        }
        _ => {
            q.submit_io_prep_cmd(tag, BufDesc::Slice(&[]), 0, None)
                .await?
        }
    };
    let mut buf = buf;
    loop {
        let result = handle_request(q, tag, ctx, buf.as_mut()).await;
        let desc = match (ctx.transport, &buf) {
            (Transport::Copy, Some(b)) => BufDesc::Slice(b.as_slice()),
            (Transport::ZeroCopy, _) => BufDesc::AutoReg(reg),
            _ => BufDesc::Slice(&[]),
        };
        q.submit_io_commit_cmd(tag, desc, result).await?;
    }
}

fn decode(iod: &sys::ublksrv_io_desc) -> Option<Op> {
    let fua = iod.op_flags & sys::UBLK_IO_F_FUA != 0;
    match iod.op_flags & 0xff {
        sys::UBLK_IO_OP_READ => Some(Op::Read),
        sys::UBLK_IO_OP_WRITE => Some(Op::Write { fua }),
        sys::UBLK_IO_OP_FLUSH => Some(Op::Flush),
        sys::UBLK_IO_OP_DISCARD => Some(Op::Discard),
        sys::UBLK_IO_OP_WRITE_ZEROES => Some(Op::WriteZeroes),
        _ => None,
    }
}

/// Serves one request; returns bytes transferred or a negative errno.
async fn handle_request(
    q: &UblkQueue<'_>,
    tag: u16,
    ctx: &QueueCtx,
    buf: Option<&mut IoBuf<u8>>,
) -> i32 {
    let iod = q.get_iod(tag);
    let Some(op) = decode(iod) else {
        return -libc::EOPNOTSUPP;
    };
    let offset = iod.start_sector << 9;
    let len = u64::from(iod.nr_sectors) << 9;
    let need_reg =
        ctx.transport == Transport::ZeroCopy && iod.op_flags & sys::UBLK_IO_F_NEED_REG_BUF != 0;
    let started = Instant::now();
    let result = serve_op(q, tag, ctx, buf, op, offset, len, need_reg).await;
    let ok = result.is_ok();
    ctx.metrics.record(op, len, ok, started.elapsed());
    match result {
        Ok(()) => match op {
            Op::Read | Op::Write { .. } => len as i32,
            _ => 0,
        },
        Err(err) => {
            tracing::warn!(op = op.name(), offset, len, "request failed: {err}");
            -err.errno()
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn serve_op(
    q: &UblkQueue<'_>,
    tag: u16,
    ctx: &QueueCtx,
    buf: Option<&mut IoBuf<u8>>,
    op: Op,
    offset: u64,
    len: u64,
    need_reg: bool,
) -> Result<()> {
    validate(ctx.target.info(), op, offset, len)?;
    if (op == Op::Read || matches!(op, Op::Write { .. })) && len as usize > ctx.max_io {
        return Err(BlockError::OutOfRange {
            offset,
            len,
            size: ctx.max_io as u64,
        });
    }
    match op {
        // Started, then awaited on the ring: a flush that waits for other threads (a
        // volume's upload) must not stop this queue's other requests, which it may be
        // waiting for.
        Op::Flush => wait_progress(ctx.target.start_flush()).await,
        Op::Discard => ctx.target.discard(offset, len),
        Op::WriteZeroes => ctx.target.write_zeroes(offset, len),
        Op::Read | Op::Write { .. } => {
            if need_reg {
                ctx.counters
                    .manual_registrations
                    .fetch_add(1, Ordering::Relaxed);
                let res = q.submit_register_io_buf(tag, tag).await;
                if res < 0 {
                    return Err(io_error("registering the request buffer", res));
                }
            }
            let moved = move_data(q, tag, ctx, buf, op, offset, len).await;
            if need_reg {
                let res = q.submit_unregister_io_buf(tag, tag).await;
                if res < 0 {
                    tracing::warn!(tag, "cannot unregister a request buffer: errno {}", -res);
                }
            }
            moved
        }
    }
}

/// Waits for a request the target finishes elsewhere: an io_uring read of its eventfd
/// completes when it is done, and the queue serves other requests meanwhile.
async fn wait_progress(progress: Progress) -> Result<()> {
    let completion = match progress {
        Progress::Done(outcome) => return outcome,
        Progress::Pending(completion) => completion,
    };
    let mut counter = [0u8; 8];
    loop {
        let sqe = opcode::Read::new(
            types::Fd(completion.raw_fd()),
            counter.as_mut_ptr(),
            counter.len() as u32,
        )
        .build();
        let res = ublk_submit_sqe_async(sqe, UblkUringData::Target as u64)
            .await
            .unwrap_or(-libc::EIO);
        if res == -libc::EINTR || res == -libc::EAGAIN {
            continue;
        }
        if res < 0 {
            // The ring cannot wait for it: block this once rather than lose the outcome.
            tracing::warn!("cannot wait on a pending request's eventfd: errno {}", -res);
            return completion.wait();
        }
        break;
    }
    completion.take().unwrap_or_else(|| {
        Err(BlockError::UblkSetup(
            "a pending request finished without an outcome".into(),
        ))
    })
}

fn io_error(what: &str, res: i32) -> BlockError {
    BlockError::Io {
        context: what.to_string(),
        source: std::io::Error::from_raw_os_error(-res),
    }
}

/// Where one piece of the request's data is, on berth's side of the transfer.
#[derive(Clone, Copy)]
enum Mem {
    /// Offset in the request's registered kernel buffer (zero-copy).
    Fixed { index: u16, at: u64 },
    /// A pointer into berth's buffer.
    Ptr(*mut u8),
}

/// A file the queue's ring moves data to or from.
#[derive(Clone, Copy)]
enum Backing {
    Fd(RawFd),
    /// The ublk char device: registered file 0 of every queue ring.
    CharDevice,
}

/// Reads (`write == false`) or writes `len` bytes at `offset` of `file` into or from
/// `mem`, resubmitting after short transfers.
async fn transfer(file: Backing, offset: u64, len: u64, mem: Mem, write: bool) -> Result<()> {
    let mut done = 0u64;
    while done < len {
        let n = (len - done) as u32;
        let at = offset + done;
        let sqe = match (file, mem, write) {
            (Backing::Fd(fd), Mem::Fixed { index, at: base }, false) => {
                opcode::ReadFixed::new(types::Fd(fd), (base + done) as *mut u8, n, index)
                    .offset(at)
                    .build()
            }
            (Backing::Fd(fd), Mem::Fixed { index, at: base }, true) => {
                opcode::WriteFixed::new(types::Fd(fd), (base + done) as *const u8, n, index)
                    .offset(at)
                    .build()
            }
            // SAFETY (pointer arithmetic): `done < len` and the buffer holds `len` bytes.
            (Backing::Fd(fd), Mem::Ptr(p), false) => {
                opcode::Read::new(types::Fd(fd), unsafe { p.add(done as usize) }, n)
                    .offset(at)
                    .build()
            }
            (Backing::Fd(fd), Mem::Ptr(p), true) => {
                opcode::Write::new(types::Fd(fd), unsafe { p.add(done as usize) }, n)
                    .offset(at)
                    .build()
            }
            (Backing::CharDevice, Mem::Ptr(p), false) => {
                opcode::Read::new(types::Fixed(0), unsafe { p.add(done as usize) }, n)
                    .offset(at)
                    .build()
            }
            (Backing::CharDevice, Mem::Ptr(p), true) => {
                opcode::Write::new(types::Fixed(0), unsafe { p.add(done as usize) }, n)
                    .offset(at)
                    .build()
            }
            (Backing::CharDevice, Mem::Fixed { .. }, _) => {
                return Err(BlockError::UblkSetup(
                    "the char device is not used in zero-copy mode".into(),
                ));
            }
        };
        let res = ublk_submit_sqe_async(sqe, UblkUringData::Target as u64)
            .await
            .unwrap_or(-libc::EIO);
        if res == -libc::EAGAIN || res == -libc::EINTR {
            continue;
        }
        if res < 0 {
            return Err(io_error(
                if write {
                    "writing the backing file"
                } else {
                    "reading the backing file"
                },
                res,
            ));
        }
        if res == 0 {
            return Err(io_error(
                "reading past the end of the backing file",
                -libc::EIO,
            ));
        }
        done += res as u64;
    }
    Ok(())
}

async fn move_data(
    q: &UblkQueue<'_>,
    tag: u16,
    ctx: &QueueCtx,
    buf: Option<&mut IoBuf<u8>>,
    op: Op,
    offset: u64,
    len: u64,
) -> Result<()> {
    let write = matches!(op, Op::Write { .. });
    let user_copy_pos = || UblkIOCtx::ublk_user_copy_pos(q.get_qid(), tag, 0);
    let base_ptr = buf.map(|b| b.as_mut_slice().as_mut_ptr());
    // User-copy: a write's data comes from the char device first.
    if write && ctx.transport == Transport::UserCopy {
        let p = base_ptr.ok_or_else(|| BlockError::UblkSetup("no bounce buffer".into()))?;
        transfer(
            Backing::CharDevice,
            user_copy_pos(),
            len,
            Mem::Ptr(p),
            false,
        )
        .await?;
    }
    let mut extents: Vec<Extent> = Vec::new();
    // A read's pin keeps its extents in place until the data has moved.
    let mut pin = None;
    let ticket = if write {
        Some(ctx.target.map_write(offset, len, &mut extents)?)
    } else {
        pin = Some(
            match ctx.target.map_read_or_fetch(offset, len, &mut extents)? {
                ReadMapping::Mapped(pin) => pin,
                ReadMapping::Fetching(completion) => {
                    // Missing chunks are fetched while the queue serves its other requests.
                    wait_progress(Progress::Pending(completion)).await?;
                    ctx.target.map_read_pinned(offset, len, &mut extents)?
                }
            },
        );
        None
    };
    let mut at = 0u64;
    let mut outcome = Ok(());
    for extent in &extents {
        if at + extent.len > len {
            outcome = Err(BlockError::UblkSetup(
                "the target mapped more than asked".into(),
            ));
            break;
        }
        let mem = match (ctx.transport, base_ptr) {
            (Transport::ZeroCopy, _) => Mem::Fixed { index: tag, at },
            // SAFETY (pointer arithmetic): `at + extent.len <= len <= max_io`, the buffer size.
            (_, Some(p)) => Mem::Ptr(unsafe { p.add(at as usize) }),
            (_, None) => {
                outcome = Err(BlockError::UblkSetup("no request buffer".into()));
                break;
            }
        };
        let step = match (extent.source, mem) {
            (Source::Zero, _) if write => Err(BlockError::UblkSetup(
                "the target mapped a write to zeros".into(),
            )),
            (Source::File { fd, offset }, mem) => {
                transfer(Backing::Fd(fd), offset, extent.len, mem, write).await
            }
            (Source::Zero, Mem::Fixed { .. }) => {
                transfer(Backing::Fd(ctx.zero), 0, extent.len, mem, false).await
            }
            (Source::Zero, Mem::Ptr(p)) => {
                // SAFETY: `p` points at `extent.len` bytes inside the buffer (checked above).
                unsafe { std::ptr::write_bytes(p, 0, extent.len as usize) };
                Ok(())
            }
        };
        if let Err(err) = step {
            outcome = Err(err);
            break;
        }
        at += extent.len;
    }
    drop(pin);
    if let Some(ticket) = ticket {
        let fua = matches!(op, Op::Write { fua: true });
        let finished =
            wait_progress(ctx.target.start_finish_write(ticket, outcome.is_ok(), fua)).await;
        outcome = outcome.and(finished);
    }
    outcome?;
    // User-copy: a read's data goes to the char device last.
    if !write && ctx.transport == Transport::UserCopy {
        let p = base_ptr.ok_or_else(|| BlockError::UblkSetup("no bounce buffer".into()))?;
        transfer(Backing::CharDevice, user_copy_pos(), len, Mem::Ptr(p), true).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const ZERO_COPY: u64 = (sys::UBLK_F_AUTO_BUF_REG | sys::UBLK_F_SUPPORT_ZERO_COPY) as u64;
    const USER_COPY: u64 = sys::UBLK_F_USER_COPY as u64;

    #[test]
    fn auto_takes_the_best_transport_the_driver_offers() {
        assert_eq!(
            choose_transport(None, ZERO_COPY | USER_COPY).unwrap(),
            Transport::ZeroCopy
        );
        assert_eq!(
            choose_transport(None, USER_COPY).unwrap(),
            Transport::UserCopy
        );
        // AUTO_BUF_REG alone is not enough: the fallback needs SUPPORT_ZERO_COPY.
        assert_eq!(
            choose_transport(None, sys::UBLK_F_AUTO_BUF_REG as u64 | USER_COPY).unwrap(),
            Transport::UserCopy
        );
        assert_eq!(choose_transport(None, 0).unwrap(), Transport::Copy);
    }

    #[test]
    fn an_explicit_transport_the_driver_lacks_is_refused_not_downgraded() {
        let err = choose_transport(Some(Transport::ZeroCopy), USER_COPY).unwrap_err();
        assert!(err.to_string().contains("zero-copy"), "{err}");
        assert!(choose_transport(Some(Transport::UserCopy), 0).is_err());
        assert_eq!(
            choose_transport(Some(Transport::Copy), ZERO_COPY).unwrap(),
            Transport::Copy
        );
        assert_eq!(
            choose_transport(Some(Transport::UserCopy), ZERO_COPY | USER_COPY).unwrap(),
            Transport::UserCopy
        );
    }

    #[test]
    fn transport_names_round_trip() {
        for t in [Transport::ZeroCopy, Transport::UserCopy, Transport::Copy] {
            assert_eq!(Transport::from_name(t.name()), Some(t));
        }
        assert_eq!(Transport::from_name("fast"), None);
    }

    #[test]
    fn forced_fallback_points_odd_tags_outside_the_buffer_table() {
        assert_eq!(auto_reg(4, true).index, 4);
        assert_eq!(auto_reg(5, true).index, u16::MAX);
        assert_eq!(auto_reg(5, false).index, 5);
        assert_eq!(
            auto_reg(5, false).flags,
            sys::UBLK_AUTO_BUF_REG_FALLBACK as u8
        );
    }
}
