//! Where a call's GPU time goes, launch by launch (for benchmarks: `GpuTimer::breakdown`).
//! While a breakdown is open, every kernel launch and cuBLAS GEMM first records an event on
//! its stream, named after it; closing records one more, and each name's time runs from its
//! event to the next one (work that is not a launch, such as a memset, counts towards the
//! launch before it). Process-wide: one breakdown at a time, on one stream.

use crate::error::{Error, Result};
use cudarc::driver::{result, sys};
use std::sync::Mutex;

struct Mark {
    name: String,
    event: sys::CUevent,
}

// SAFETY: a CUevent is a driver handle, usable from any thread of its context.
unsafe impl Send for Mark {}

static OPEN: Mutex<Option<Vec<Mark>>> = Mutex::new(None);

fn marks() -> std::sync::MutexGuard<'static, Option<Vec<Mark>>> {
    OPEN.lock().unwrap_or_else(|p| p.into_inner())
}

/// Starts recording marks (discarding any left open).
pub(crate) fn open() -> Result<()> {
    let left = marks().replace(Vec::new());
    destroy(left.unwrap_or_default())
}

/// Records a mark named `name` on `stream` if a breakdown is open (the stream's context
/// current).
pub(crate) fn mark(stream: sys::CUstream, name: &str) -> Result<()> {
    let mut open = marks();
    let Some(list) = open.as_mut() else {
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
    let list = marks().take().unwrap_or_default();
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
/// at its start, while one is open.
static WALL: Mutex<Option<Vec<(String, std::time::Instant)>>> = Mutex::new(None);

fn wall() -> std::sync::MutexGuard<'static, Option<Vec<(String, std::time::Instant)>>> {
    WALL.lock().unwrap_or_else(|p| p.into_inner())
}

/// Starts recording the emulator's launches (discarding any left open).
pub(crate) fn open_wall() {
    *wall() = Some(Vec::new());
}

/// Records an emulated launch of `name` if a breakdown is open.
pub(crate) fn mark_wall(name: &str) {
    if let Some(list) = wall().as_mut() {
        list.push((name.to_string(), std::time::Instant::now()));
    }
}

/// Closes the emulator's breakdown: each launch's name and its microseconds to the next, in
/// launch order.
pub(crate) fn close_wall() -> Vec<(String, f64)> {
    let list = wall().take().unwrap_or_default();
    let now = std::time::Instant::now();
    let ends = list.iter().skip(1).map(|&(_, t)| t).chain([now]);
    list.iter()
        .zip(ends)
        .map(|((name, start), end)| (name.clone(), (end - *start).as_secs_f64() * 1e6))
        .collect()
}
