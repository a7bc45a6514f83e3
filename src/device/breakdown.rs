//! Where a call's GPU time goes, launch by launch (for benchmarks: `GpuTimer::breakdown`).
//! While a breakdown is open, every kernel launch and cuBLAS GEMM of the thread that opened
//! it first records an event on its stream, named after it (launches of other threads, such
//! as tests running beside it, are not its call's); closing records one more, and each name's
//! time runs from its event to the next one (work that is not a launch, such as a memset,
//! counts towards the launch before it). One breakdown a thread, each on one stream.

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

/// The open breakdowns: each thread whose launches one records, and its marks.
type Open<M> = Mutex<Vec<(ThreadId, Vec<M>)>>;

static OPEN: Open<Mark> = Mutex::new(Vec::new());

fn lock<M>(open: &'static Open<M>) -> MutexGuard<'static, Vec<(ThreadId, Vec<M>)>> {
    open.lock().unwrap_or_else(|p| p.into_inner())
}

/// The marks of the breakdown open on this thread, if one is.
fn this_threads<M>(open: &mut [(ThreadId, Vec<M>)]) -> Option<&mut Vec<M>> {
    let me = std::thread::current().id();
    open.iter_mut()
        .find(|(t, _)| *t == me)
        .map(|(_, list)| list)
}

/// The marks of the breakdown open on this thread, closing it (none if none is open).
fn take_this_threads<M>(open: &'static Open<M>) -> Vec<M> {
    let me = std::thread::current().id();
    let mut open = lock(open);
    match open.iter().position(|(t, _)| *t == me) {
        Some(i) => open.swap_remove(i).1,
        None => Vec::new(),
    }
}

/// Starts a breakdown on this thread; returns the marks of one it left open, now closed.
fn start<M>(open: &'static Open<M>) -> Vec<M> {
    let left = take_this_threads(open);
    lock(open).push((std::thread::current().id(), Vec::new()));
    left
}

/// Starts recording this thread's marks (discarding any breakdown it left open).
pub(crate) fn open() -> Result<()> {
    destroy(start(&OPEN))
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
    let list = take_this_threads(&OPEN);
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

/// Destroys every mark's event (all of them, whatever fails), then says the first failure.
fn destroy(list: Vec<Mark>) -> Result<()> {
    let mut first = Ok(());
    for m in list {
        // SAFETY: each event is destroyed once, after the last use of it.
        let r = unsafe { result::event::destroy(m.event) }
            .map_err(|e| Error::driver("cuEventDestroy", e));
        first = first.and(r);
    }
    first
}

/// The emulator's breakdowns (tests of the benchmarks): each launch's name and the wall clock
/// at its start (an emulated launch runs on the thread that makes it).
static WALL: Open<(String, std::time::Instant)> = Mutex::new(Vec::new());

/// Starts recording this thread's emulated launches (discarding any breakdown it left open).
pub(crate) fn open_wall() {
    start(&WALL);
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
    let list = take_this_threads(&WALL);
    let now = std::time::Instant::now();
    let ends = list.iter().skip(1).map(|&(_, t)| t).chain([now]);
    list.iter()
        .zip(ends)
        .map(|((name, start), end)| (name.clone(), (end - *start).as_secs_f64() * 1e6))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A breakdown is its own thread's: another thread's open, marks and close neither take
    /// nor end nor add to it.
    #[test]
    fn breakdowns_of_two_threads_stay_apart() {
        open_wall();
        mark_wall("first");
        let other = std::thread::spawn(|| {
            let before = close_wall();
            open_wall();
            mark_wall("other");
            (before, close_wall())
        });
        let (before, theirs) = other.join().unwrap();
        assert!(before.is_empty(), "{before:?}");
        assert_eq!(theirs.len(), 1);
        mark_wall("second");
        let names: Vec<String> = close_wall().into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["first", "second"]);
    }
}
