//! Where a call's GPU time goes, launch by launch (for benchmarks: `GpuTimer::breakdown`).
//! While a breakdown is open, every kernel launch and cuBLAS GEMM of the thread that opened
//! it first records an event on its stream, named after it (launches of other threads, such
//! as tests running beside it, are not its call's); closing records one more, and each name's
//! time runs from its event to the next one (work that is not a launch, such as a memset,
//! counts towards the launch before it). Process-wide: one breakdown at a time, on one stream.

use crate::error::{Error, Result};
use cudarc::driver::{result, sys};
use std::sync::{Mutex, MutexGuard};
use std::thread::ThreadId;

struct Mark {
    name: String,
    event: sys::CUevent,
}

// SAFETY: a CUevent is a driver handle, usable from any thread of its context.
unsafe impl Send for Mark {}

/// The open breakdown: the thread whose launches it records, and its marks.
type Open<M> = Mutex<Option<(ThreadId, Vec<M>)>>;

static OPEN: Open<Mark> = Mutex::new(None);

fn lock<M>(open: &'static Open<M>) -> MutexGuard<'static, Option<(ThreadId, Vec<M>)>> {
    open.lock().unwrap_or_else(|p| p.into_inner())
}

/// The marks of the breakdown open on this thread, if one is.
fn this_threads<M>(open: &mut Option<(ThreadId, Vec<M>)>) -> Option<&mut Vec<M>> {
    open.as_mut()
        .filter(|(t, _)| *t == std::thread::current().id())
        .map(|(_, list)| list)
}

/// Starts recording this thread's marks (discarding any breakdown left open).
pub(crate) fn open() -> Result<()> {
    let left = lock(&OPEN).replace((std::thread::current().id(), Vec::new()));
    destroy(left.map(|(_, list)| list).unwrap_or_default())
}

/// Records a mark named `name` on `stream` if a breakdown is open on this thread (the
/// stream's context current).
pub(crate) fn mark(stream: sys::CUstream, name: &str) -> Result<()> {
    let mut open = lock(&OPEN);
    let Some(list) = this_threads(&mut open) else {
        return Ok(());
    };
    let event = result::event::create(sys::CUevent_flags::CU_EVENT_DEFAULT)
        .map_err(|e| Error::driver("cuEventCreate", e))?;
    list.push(Mark {
        name: name.to_string(),
        event,
    });
    // SAFETY: a live event and the caller's live stream.
    unsafe { result::event::record(event, stream) }.map_err(|e| Error::driver("cuEventRecord", e))
}

/// Closes the breakdown on `stream`: each mark's name and its microseconds to the next, in
/// launch order.
pub(crate) fn close(stream: sys::CUstream) -> Result<Vec<(String, f64)>> {
    let list = lock(&OPEN).take().map(|(_, list)| list).unwrap_or_default();
    let times = elapsed(&list, stream);
    destroy(list)?;
    times
}

fn elapsed(list: &[Mark], stream: sys::CUstream) -> Result<Vec<(String, f64)>> {
    if list.is_empty() {
        return Ok(Vec::new());
    }
    let end = result::event::create(sys::CUevent_flags::CU_EVENT_DEFAULT)
        .map_err(|e| Error::driver("cuEventCreate", e))?;
    // SAFETY: live events, recorded on the caller's live stream; `end` is destroyed here.
    let times = unsafe {
        result::event::record(end, stream)
            .and_then(|()| result::event::synchronize(end))
            .map_err(|e| Error::driver("cuEventSynchronize", e))
            .and_then(|()| {
                list.iter()
                    .zip(list.iter().skip(1).map(|m| m.event).chain([end]))
                    .map(|(m, next)| {
                        result::event::elapsed(m.event, next)
                            .map(|ms| (m.name.clone(), ms as f64 * 1e3))
                            .map_err(|e| Error::driver("cuEventElapsedTime", e))
                    })
                    .collect()
            })
    };
    // SAFETY: `end` is not used after this.
    unsafe { result::event::destroy(end) }.map_err(|e| Error::driver("cuEventDestroy", e))?;
    times
}

fn destroy(list: Vec<Mark>) -> Result<()> {
    for m in list {
        // SAFETY: each event is destroyed once, after the last use of it.
        unsafe { result::event::destroy(m.event) }
            .map_err(|e| Error::driver("cuEventDestroy", e))?;
    }
    Ok(())
}

/// The emulator's breakdowns (tests of the benchmarks): each launch's name and the wall clock
/// at its start (an emulated launch runs on the thread that makes it).
static WALL: Open<(String, std::time::Instant)> = Mutex::new(None);

/// Starts recording this thread's emulated launches (discarding any breakdown left open).
pub(crate) fn open_wall() {
    *lock(&WALL) = Some((std::thread::current().id(), Vec::new()));
}

/// Records an emulated launch of `name` if a breakdown is open on this thread.
pub(crate) fn mark_wall(name: &str) {
    if let Some(list) = this_threads(&mut lock(&WALL)) {
        list.push((name.to_string(), std::time::Instant::now()));
    }
}

/// Closes the emulator's breakdown: each launch's name and its microseconds to the next, in
/// launch order.
pub(crate) fn close_wall() -> Vec<(String, f64)> {
    let list = lock(&WALL).take().map(|(_, list)| list).unwrap_or_default();
    let now = std::time::Instant::now();
    let ends = list.iter().skip(1).map(|&(_, t)| t).chain([now]);
    list.iter()
        .zip(ends)
        .map(|((name, start), end)| (name.clone(), (end - *start).as_secs_f64() * 1e6))
        .collect()
}
