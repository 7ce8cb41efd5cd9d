//! Owned libibverbs objects: each wraps one pointer, frees it on drop, and
//! holds an `Arc` of what it was made from, so teardown runs in the order
//! the verbs API requires (QP before CQ before channel, MR before PD, all
//! before the device context).
//!
//! libibverbs objects are thread-safe (rdma-core's providers lock inside
//! every verb), so the wrappers are `Send + Sync`.

use std::ffi::CStr;
use std::io;
use std::ptr;
use std::sync::Arc;

use rdma_sys::*;

/// Wraps the `errno` of the verb that just failed.
fn last_error(what: &str) -> io::Error {
    let e = io::Error::last_os_error();
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

/// A verb that returns an error number (0 on success, not `errno`).
fn check(rc: i32, what: &str) -> io::Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        let e = io::Error::from_raw_os_error(rc.abs());
        Err(io::Error::new(e.kind(), format!("{what}: {e}")))
    }
}

/// The names of the RDMA devices libibverbs sees.
pub fn device_names() -> io::Result<Vec<String>> {
    let mut n = 0;
    // SAFETY: `n` is a live c_int; the list is freed below.
    let list = unsafe { ibv_get_device_list(&mut n) };
    if list.is_null() {
        return Err(last_error("ibv_get_device_list"));
    }
    let mut names = Vec::new();
    for i in 0..n.max(0) as usize {
        // SAFETY: the list holds `n` valid device pointers.
        let dev = unsafe { *list.add(i) };
        // SAFETY: `dev` is a valid device; the name is a NUL-terminated string
        // owned by it, copied out before the list is freed.
        let name = unsafe { CStr::from_ptr(ibv_get_device_name(dev)) };
        names.push(name.to_string_lossy().into_owned());
    }
    // SAFETY: `list` came from ibv_get_device_list and is freed once.
    unsafe { ibv_free_device_list(list) };
    Ok(names)
}

/// An open device with one protection domain: everything a connection
/// registers or creates on that device hangs off it.
pub struct Device {
    name: String,
    ctx: *mut ibv_context,
    pd: *mut ibv_pd,
}

// SAFETY: libibverbs contexts and PDs may be used from any thread.
unsafe impl Send for Device {}
// SAFETY: as above; every verb on them locks inside the provider.
unsafe impl Sync for Device {}

impl Device {
    /// Opens the device called `name` and allocates its protection domain.
    pub fn open(name: &str) -> io::Result<Arc<Device>> {
        let mut n = 0;
        // SAFETY: `n` is a live c_int; the list is freed below.
        let list = unsafe { ibv_get_device_list(&mut n) };
        if list.is_null() {
            return Err(last_error("ibv_get_device_list"));
        }
        let mut ctx = ptr::null_mut();
        let mut found = false;
        for i in 0..n.max(0) as usize {
            // SAFETY: the list holds `n` valid device pointers.
            let dev = unsafe { *list.add(i) };
            // SAFETY: `dev` is valid; its name is NUL-terminated.
            let dev_name = unsafe { CStr::from_ptr(ibv_get_device_name(dev)) };
            if dev_name.to_bytes() == name.as_bytes() {
                found = true;
                // SAFETY: `dev` is valid until the list is freed; an opened
                // context stays valid after that (libibverbs refcounts it).
                ctx = unsafe { ibv_open_device(dev) };
                break;
            }
        }
        let open_error = last_error("ibv_open_device");
        // SAFETY: `list` came from ibv_get_device_list and is freed once.
        unsafe { ibv_free_device_list(list) };
        if !found {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("no RDMA device called {name}"),
            ));
        }
        if ctx.is_null() {
            return Err(open_error);
        }
        // SAFETY: `ctx` is an open context.
        let pd = unsafe { ibv_alloc_pd(ctx) };
        if pd.is_null() {
            let e = last_error("ibv_alloc_pd");
            // SAFETY: `ctx` is open and owned here, closed once.
            unsafe { ibv_close_device(ctx) };
            return Err(e);
        }
        Ok(Arc::new(Device {
            name: name.to_string(),
            ctx,
            pd,
        }))
    }

    /// The device's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Active MTU (an `ibv_mtu` value) and LID of `port`; fails unless the
    /// port is active.
    pub fn port(&self, port: u8) -> io::Result<(ibv_mtu::Type, u16)> {
        // SAFETY: ibv_port_attr is plain data; all-zero is a valid value.
        let mut attr: ibv_port_attr = unsafe { std::mem::zeroed() };
        // SAFETY: `ctx` is open and `attr` is a live, writable port_attr.
        let rc = unsafe { ___ibv_query_port(self.ctx, port, &mut attr) };
        check(rc, "ibv_query_port")?;
        if attr.state != ibv_port_state::IBV_PORT_ACTIVE {
            return Err(io::Error::new(
                io::ErrorKind::NotConnected,
                format!("port {port} of {} is not active", self.name),
            ));
        }
        Ok((attr.active_mtu, attr.lid))
    }

    /// Registers `len` bytes at `addr` with `access` (`ibv_access_flags`).
    ///
    /// # Safety
    ///
    /// The range must stay mapped for as long as the returned region lives
    /// (the device reads or writes it, within `access`, until then).
    pub unsafe fn register(
        self: &Arc<Self>,
        addr: *mut u8,
        len: usize,
        access: ibv_access_flags,
    ) -> io::Result<Mr> {
        // SAFETY: `pd` is valid; the caller keeps the range mapped.
        let mr = unsafe { ibv_reg_mr(self.pd, addr.cast(), len, access.0 as i32) };
        if mr.is_null() {
            return Err(last_error("ibv_reg_mr"));
        }
        Ok(Mr {
            mr,
            _device: self.clone(),
        })
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        // SAFETY: every object made on this PD holds an Arc of the device, so
        // none is left; the PD and context are freed once, PD first.
        unsafe {
            ibv_dealloc_pd(self.pd);
            ibv_close_device(self.ctx);
        }
    }
}

/// A registered memory region.
pub struct Mr {
    mr: *mut ibv_mr,
    _device: Arc<Device>,
}

// SAFETY: an MR is an immutable handle (its keys); dereg is thread-safe.
unsafe impl Send for Mr {}
// SAFETY: as above.
unsafe impl Sync for Mr {}

impl Mr {
    /// Key for local work requests.
    pub fn lkey(&self) -> u32 {
        // SAFETY: `mr` is valid while self lives.
        unsafe { (*self.mr).lkey }
    }

    /// Key the peer names in one-sided operations.
    pub fn rkey(&self) -> u32 {
        // SAFETY: `mr` is valid while self lives.
        unsafe { (*self.mr).rkey }
    }
}

impl Drop for Mr {
    fn drop(&mut self) {
        // SAFETY: `mr` was registered by Device::register and is deregistered once.
        unsafe { ibv_dereg_mr(self.mr) };
    }
}

/// A completion queue with its own completion channel (a pollable fd that
/// becomes readable when an armed CQ gets a completion).
pub struct Cq {
    cq: *mut ibv_cq,
    channel: *mut ibv_comp_channel,
    device: Arc<Device>,
}

// SAFETY: CQ verbs are thread-safe in rdma-core; ferry polls a CQ from one
// thread at a time anyway.
unsafe impl Send for Cq {}
// SAFETY: as above.
unsafe impl Sync for Cq {}

impl Cq {
    /// A CQ of at least `entries` completions and its channel, set
    /// non-blocking so `get_event` never waits.
    pub fn new(device: &Arc<Device>, entries: i32) -> io::Result<Cq> {
        // SAFETY: the context is open.
        let channel = unsafe { ibv_create_comp_channel(device.ctx) };
        if channel.is_null() {
            return Err(last_error("ibv_create_comp_channel"));
        }
        // SAFETY: `channel` is valid; its fd is ours to configure.
        let fd = unsafe { (*channel).fd };
        // SAFETY: `fd` is the channel's open fd; F_SETFL takes an int flag.
        let nonblock = unsafe { libc::fcntl(fd, libc::F_SETFL, libc::O_NONBLOCK) };
        // SAFETY: the context and channel are valid.
        let cq = unsafe { ibv_create_cq(device.ctx, entries, ptr::null_mut(), channel, 0) };
        if cq.is_null() || nonblock != 0 {
            let e = if cq.is_null() {
                last_error("ibv_create_cq")
            } else {
                io::Error::other("cannot make the completion channel non-blocking")
            };
            // SAFETY: each was created above and is destroyed once, CQ first.
            unsafe {
                if !cq.is_null() {
                    ibv_destroy_cq(cq);
                }
                ibv_destroy_comp_channel(channel);
            }
            return Err(e);
        }
        Ok(Cq {
            cq,
            channel,
            device: device.clone(),
        })
    }

    /// The channel's fd, for poll(2).
    pub fn fd(&self) -> i32 {
        // SAFETY: the channel is valid while self lives.
        unsafe { (*self.channel).fd }
    }

    /// Asks for an event on the channel at the next completion.
    pub fn arm(&self) -> io::Result<()> {
        // SAFETY: the CQ is valid.
        check(
            unsafe { ibv_req_notify_cq(self.cq, 0) },
            "ibv_req_notify_cq",
        )
    }

    /// Consumes one pending channel event, if any, and acknowledges it.
    /// Returns whether there was one.
    pub fn take_event(&self) -> bool {
        let mut cq = ptr::null_mut();
        let mut ctx = ptr::null_mut();
        // SAFETY: the channel is valid and non-blocking; the out-pointers are live.
        let rc = unsafe { ibv_get_cq_event(self.channel, &mut cq, &mut ctx) };
        if rc != 0 {
            return false;
        }
        // SAFETY: the event was for our only CQ; acknowledging it at once
        // keeps the count ibv_destroy_cq waits for at zero.
        unsafe { ibv_ack_cq_events(self.cq, 1) };
        true
    }

    /// Polls up to `wcs.len()` completions; returns how many were filled.
    pub fn poll(&self, wcs: &mut [ibv_wc]) -> io::Result<usize> {
        // SAFETY: the CQ is valid and `wcs` has room for the count passed.
        let n = unsafe { ibv_poll_cq(self.cq, wcs.len() as i32, wcs.as_mut_ptr()) };
        if n < 0 {
            return Err(io::Error::other(format!("ibv_poll_cq failed ({n})")));
        }
        Ok(n as usize)
    }
}

impl Drop for Cq {
    fn drop(&mut self) {
        // SAFETY: the QP using this CQ holds an Arc of it, so it is gone;
        // every event was acknowledged when taken. Destroyed once, CQ first.
        unsafe {
            ibv_destroy_cq(self.cq);
            ibv_destroy_comp_channel(self.channel);
        }
    }
}

/// Sizes of a queue pair.
#[derive(Clone, Copy, Debug)]
pub struct QpCaps {
    /// Send queue depth.
    pub send_wr: u32,
    /// Receive queue depth.
    pub recv_wr: u32,
    /// Bytes a send may carry inline (copied into the work request).
    pub inline: u32,
}

/// What a queue pair needs to know about its peer to connect.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// Queue pair number.
    pub qpn: u32,
    /// Initial packet sequence number (24 bits).
    pub psn: u32,
    /// GID (RoCE and routed InfiniBand).
    pub gid: [u8; 16],
    /// LID (InfiniBand; 0 on RoCE).
    pub lid: u16,
    /// Active MTU of the port (an `ibv_mtu` value).
    pub mtu: u8,
}

/// A reliable-connected queue pair whose send and receive completions go to one CQ.
pub struct Qp {
    qp: *mut ibv_qp,
    _cq: Arc<Cq>,
    device: Arc<Device>,
}

// SAFETY: posting and modifying are thread-safe verbs in rdma-core.
unsafe impl Send for Qp {}
// SAFETY: as above.
unsafe impl Sync for Qp {}

impl Qp {
    /// A new RC QP in the RESET state.
    pub fn new(cq: &Arc<Cq>, caps: QpCaps) -> io::Result<Qp> {
        // SAFETY: plain data; zero is valid for every field not set below.
        let mut init: ibv_qp_init_attr = unsafe { std::mem::zeroed() };
        init.send_cq = cq.cq;
        init.recv_cq = cq.cq;
        init.qp_type = ibv_qp_type::IBV_QPT_RC;
        init.cap = ibv_qp_cap {
            max_send_wr: caps.send_wr,
            max_recv_wr: caps.recv_wr,
            max_send_sge: 1,
            max_recv_sge: 1,
            max_inline_data: caps.inline,
        };
        // SAFETY: the PD and CQ are valid; `init` is a live init_attr.
        let qp = unsafe { ibv_create_qp(cq.device.pd, &mut init) };
        if qp.is_null() {
            return Err(last_error("ibv_create_qp"));
        }
        Ok(Qp {
            qp,
            _cq: cq.clone(),
            device: cq.device.clone(),
        })
    }

    /// This QP's number.
    pub fn qpn(&self) -> u32 {
        // SAFETY: the QP is valid while self lives.
        unsafe { (*self.qp).qp_num }
    }

    /// RESET -> INIT: receives may be posted from here on; the peer may
    /// write into (but not read from) our registered memory.
    pub fn init(&self, port: u8) -> io::Result<()> {
        // SAFETY: plain data.
        let mut attr: ibv_qp_attr = unsafe { std::mem::zeroed() };
        attr.qp_state = ibv_qp_state::IBV_QPS_INIT;
        attr.pkey_index = 0;
        attr.port_num = port;
        attr.qp_access_flags = ibv_access_flags::IBV_ACCESS_REMOTE_WRITE.0;
        let mask = ibv_qp_attr_mask::IBV_QP_STATE
            | ibv_qp_attr_mask::IBV_QP_PKEY_INDEX
            | ibv_qp_attr_mask::IBV_QP_PORT
            | ibv_qp_attr_mask::IBV_QP_ACCESS_FLAGS;
        self.modify(&mut attr, mask, "INIT")
    }

    /// INIT -> RTR -> RTS, connected to `peer` through our `port` and
    /// `gid_index`; `mtu` is the path MTU both ports support.
    pub fn connect(
        &self,
        port: u8,
        gid_index: u8,
        global: bool,
        own_psn: u32,
        peer: &Endpoint,
        mtu: ibv_mtu::Type,
    ) -> io::Result<()> {
        // SAFETY: plain data.
        let mut attr: ibv_qp_attr = unsafe { std::mem::zeroed() };
        attr.qp_state = ibv_qp_state::IBV_QPS_RTR;
        attr.path_mtu = mtu;
        attr.dest_qp_num = peer.qpn;
        attr.rq_psn = peer.psn;
        attr.max_dest_rd_atomic = 1;
        // 0.64 ms before a sender retries a message that found no receive posted.
        attr.min_rnr_timer = 12;
        attr.ah_attr.is_global = u8::from(global);
        attr.ah_attr.dlid = peer.lid;
        attr.ah_attr.port_num = port;
        attr.ah_attr.grh.dgid.raw = peer.gid;
        attr.ah_attr.grh.sgid_index = gid_index;
        attr.ah_attr.grh.hop_limit = 64;
        let mask = ibv_qp_attr_mask::IBV_QP_STATE
            | ibv_qp_attr_mask::IBV_QP_AV
            | ibv_qp_attr_mask::IBV_QP_PATH_MTU
            | ibv_qp_attr_mask::IBV_QP_DEST_QPN
            | ibv_qp_attr_mask::IBV_QP_RQ_PSN
            | ibv_qp_attr_mask::IBV_QP_MAX_DEST_RD_ATOMIC
            | ibv_qp_attr_mask::IBV_QP_MIN_RNR_TIMER;
        self.modify(&mut attr, mask, "RTR")?;

        // SAFETY: plain data.
        let mut attr: ibv_qp_attr = unsafe { std::mem::zeroed() };
        attr.qp_state = ibv_qp_state::IBV_QPS_RTS;
        attr.sq_psn = own_psn;
        // Ack timeout 4.096 us x 2^14 = 67 ms, 7 retries: a silent peer
        // fails a send within about half a second.
        attr.timeout = 14;
        attr.retry_cnt = 7;
        // 7 = retry forever while the peer has no receive posted: its
        // progress thread reposts promptly, and credits bound the rest.
        attr.rnr_retry = 7;
        attr.max_rd_atomic = 1;
        let mask = ibv_qp_attr_mask::IBV_QP_STATE
            | ibv_qp_attr_mask::IBV_QP_SQ_PSN
            | ibv_qp_attr_mask::IBV_QP_TIMEOUT
            | ibv_qp_attr_mask::IBV_QP_RETRY_CNT
            | ibv_qp_attr_mask::IBV_QP_RNR_RETRY
            | ibv_qp_attr_mask::IBV_QP_MAX_QP_RD_ATOMIC;
        self.modify(&mut attr, mask, "RTS")
    }

    /// Moves the QP to the error state: everything posted completes with a
    /// flush error, and the peer's next operations fail.
    pub fn set_error(&self) {
        // SAFETY: plain data.
        let mut attr: ibv_qp_attr = unsafe { std::mem::zeroed() };
        attr.qp_state = ibv_qp_state::IBV_QPS_ERR;
        let _ = self.modify(&mut attr, ibv_qp_attr_mask::IBV_QP_STATE, "ERR");
    }

    fn modify(&self, attr: &mut ibv_qp_attr, mask: ibv_qp_attr_mask, to: &str) -> io::Result<()> {
        // SAFETY: the QP is valid and `attr` is a live qp_attr.
        let rc = unsafe { ibv_modify_qp(self.qp, attr, mask.0 as i32) };
        check(rc, &format!("ibv_modify_qp to {to}"))
    }

    /// Posts one send work request.
    ///
    /// # Safety
    ///
    /// Every SGE's memory must be registered under its lkey and stay
    /// unchanged-in-use (not freed) until the request completes; a remote
    /// address must be one the peer granted.
    pub unsafe fn post_send(&self, wr: &mut ibv_send_wr) -> io::Result<()> {
        let mut bad = ptr::null_mut();
        // SAFETY: per the caller's contract; `wr` is a live request.
        let rc = unsafe { ibv_post_send(self.qp, wr, &mut bad) };
        check(rc, "ibv_post_send")
    }

    /// Posts one receive of `len` bytes at `addr`.
    ///
    /// # Safety
    ///
    /// The buffer must be registered under `lkey` and not be touched or
    /// freed until its completion is polled.
    pub unsafe fn post_recv(
        &self,
        wr_id: u64,
        addr: *mut u8,
        len: u32,
        lkey: u32,
    ) -> io::Result<()> {
        let mut sge = ibv_sge {
            addr: addr as u64,
            length: len,
            lkey,
        };
        let mut wr = ibv_recv_wr {
            wr_id,
            next: ptr::null_mut(),
            sg_list: &mut sge,
            num_sge: 1,
        };
        let mut bad = ptr::null_mut();
        // SAFETY: the QP is valid; `wr` and `sge` live across the call (the
        // provider copies them); the buffer contract is the caller's.
        let rc = unsafe { ibv_post_recv(self.qp, &mut wr, &mut bad) };
        check(rc, "ibv_post_recv")
    }

    /// The device this QP lives on.
    pub fn device(&self) -> &Arc<Device> {
        &self.device
    }
}

impl Drop for Qp {
    fn drop(&mut self) {
        // SAFETY: created by ibv_create_qp and destroyed once.
        unsafe { ibv_destroy_qp(self.qp) };
    }
}

/// Human-readable name of a work completion status.
pub fn status_str(status: ibv_wc_status::Type) -> String {
    // SAFETY: returns a static NUL-terminated string for any value.
    let s = unsafe { CStr::from_ptr(ibv_wc_status_str(status)) };
    s.to_string_lossy().into_owned()
}
