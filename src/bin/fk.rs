//! `fk`: the command-line face of finetune-kernels.
//!
//!   fk info                       the device, driver, PTX target, and why kernels cannot run
//!   fk check [--small] [--seed N] every kernel against its reference; exit 0 only if all pass
//!   fk regdump --out FILE [--rcp-table FILE]         record tensor-core register layouts on this GPU
//!   fk bench --json F --md F [--seconds N]   GPU benchmarks with floors and same-run
//!                                 baselines, each family in a process of its own, at most
//!                                 N s each; --family NAME [--md F] [--ceilings F]: one, here
//!   fk profile nf4|lora           one launch of each kernel with open questions, for ncu
//!   fk kernels [--resources]      every (module, kernel) the Rust side can launch; with
//!                                 --resources, each as this GPU's driver compiled it
//!   fk merge BASE ADAPTER_DIR OUT a PEFT LoRA adapter merged into a safetensors checkpoint
//!   fk quantize IN OUT [...]      a checkpoint's linear weights to NF4, in bitsandbytes' layout
//!
//! Exit status: 0 when the command did what it was asked (and every check passed); 1 when
//! `fk check` or `fk bench` found a failure (for `fk check`, a kernel that fails to run
//! counts as one, and so, with `FK_REQUIRE_GPU=1`, do no GPU and a driver that fails); 2 on
//! any other error (a bad argument, a file
//! that is missing or not what it claims, no GPU for a command that needs one), with its
//! message.
//!
//! A checkpoint (BASE, IN) is a safetensors file, a shard index
//! (`model.safetensors.index.json`), or a model directory holding `model.safetensors` or an
//! index. For an index or a directory, OUT is a directory: the weights (shards under their
//! names, beside their index) and the model's other files (config, tokenizer).

use finetune_kernels::bench;
use finetune_kernels::check::{self, Scale};
use finetune_kernels::device::{probe_driver, ptx, CudaDevice, Device, Kernel};
use finetune_kernels::files::write_whole;
use finetune_kernels::lora::{
    self,
    adapter::{merge_checkpoint, Adapter},
};
use finetune_kernels::nf4::checkpoint::{quantize_file, QuantizeOptions};
use finetune_kernels::{params, regdump, Error};
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

const USAGE: &str = "usage: fk info | fk check [--small] [--seed N] | fk regdump --out FILE [--rcp-table FILE] | fk bench --json FILE (--md FILE [--seconds N] | --family NAME [--md FILE] [--ceilings FILE]) | fk profile nf4|lora | fk kernels [--resources] | fk quantize IN OUT [--blocksize N] [--no-double-quant] [--include GLOB]... [--exclude GLOB]... [--no-default-excludes] [--transpose GLOB]... | fk merge BASE ADAPTER_DIR OUT (IN, BASE: a .safetensors file, a shard index, or a model directory; OUT: a file, or a directory for an index or a directory)";

fn main() -> ExitCode {
    match utf8_args().and_then(|args| run(&args)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(msg) => {
            eprintln!("fk: {msg}");
            ExitCode::from(2)
        }
    }
}

/// The arguments after the program's name. One that is not UTF-8 (a file name in another
/// encoding) is an error naming it, where `std::env::args` would panic.
fn utf8_args() -> Result<Vec<String>, String> {
    std::env::args_os()
        .skip(1)
        .map(|arg| {
            arg.into_string()
                .map_err(|arg| format!("argument {arg:?} is not UTF-8"))
        })
        .collect()
}

/// Runs the command `args` names: whether it did what it was asked, or why not.
fn run(args: &[String]) -> Result<bool, String> {
    let rest = args.get(1..).unwrap_or_default();
    match args.first().map(String::as_str) {
        Some("info") | None => known_args(rest, &[], &[]).map(|()| {
            let _ = info();
            true
        }),
        Some("check") => run_check(rest),
        Some("regdump") => run_regdump(rest).map(|_| true),
        Some("bench") => run_bench(rest),
        Some("profile") => run_profile(rest).map(|_| true),
        Some("quantize") => run_quantize(rest).map(|_| true),
        Some("merge") => run_merge(rest).map(|_| true),
        Some("kernels") => known_args(rest, &["--resources"], &[]).and_then(|()| {
            if rest.is_empty() {
                for k in all_kernels() {
                    println!("{} {}", k.module, k.name);
                }
                Ok(true)
            } else {
                run_resources().map(|_| true)
            }
        }),
        Some("-h" | "--help" | "help") => {
            println!("{USAGE}");
            Ok(true)
        }
        Some(other) => Err(format!("unknown command {other:?}\n{USAGE}")),
    }
}

/// Errors on an argument that is none of `switches` and `valued` (each of those followed by
/// its value), and on a valued one given twice: a mistyped flag is not silently ignored, nor
/// a second value (`flag_value` reads the first).
fn known_args(args: &[String], switches: &[&str], valued: &[&str]) -> Result<(), String> {
    let mut it = args.iter();
    let mut given = Vec::new();
    while let Some(arg) = it.next() {
        if valued.contains(&arg.as_str()) {
            it.next().ok_or(format!("{arg} needs a value"))?;
            if given.contains(&arg) {
                return Err(format!("{arg} is given twice"));
            }
            given.push(arg);
        } else if !switches.contains(&arg.as_str()) {
            return Err(format!("unknown argument {arg:?}\n{USAGE}"));
        }
    }
    Ok(())
}

fn flag_value<'a>(args: &'a [String], flag: &str) -> Result<Option<&'a str>, String> {
    match args.iter().position(|a| a == flag) {
        Some(i) => args
            .get(i + 1)
            .map(|s| Some(s.as_str()))
            .ok_or(format!("{flag} needs a value")),
        None => Ok(None),
    }
}

/// Prints what this machine has; returns the device kernels would run on.
fn info() -> Result<Device, Error> {
    println!("finetune-kernels {}", env!("CARGO_PKG_VERSION"));
    let targets: Vec<&str> = ptx::Target::ALL.iter().map(|t| t.name()).collect();
    let source = if ptx::built_from_source() {
        "compiled from cuda/ by FK_NVCC"
    } else {
        "committed, ISA 9.0"
    };
    println!("PTX: {} ({source})", targets.join(", "));
    match probe_driver() {
        Ok(d) => println!(
            "driver: CUDA {}.{}, {} device(s)",
            d.version / 1000,
            d.version % 1000 / 10,
            d.device_count
        ),
        Err(e) => println!("driver: {e}"),
    }
    match Device::best() {
        Ok(dev) => {
            println!("device: {}", dev.describe());
            if let (false, Err(why)) = (dev.is_gpu(), Device::cuda(0)) {
                println!("no GPU: {why}");
            }
            println!("kernels run on: {}", dev.backend());
            Ok(dev)
        }
        Err(e) => {
            println!("kernels cannot run here: {e}");
            Err(e)
        }
    }
}

fn run_check(args: &[String]) -> Result<bool, String> {
    known_args(args, &["--small"], &["--seed"])?;
    let seed = match flag_value(args, "--seed")? {
        Some(s) => s.parse().map_err(|e| format!("--seed {s}: {e}"))?,
        None => rand::random(),
    };
    let require_gpu = std::env::var("FK_REQUIRE_GPU").as_deref() == Ok("1");
    let dev = match info() {
        Ok(dev) if require_gpu && !dev.is_gpu() => {
            println!("FK_REQUIRE_GPU=1, but kernels would run on the emulator: no check");
            return Ok(false);
        }
        Ok(dev) => dev,
        // No device at all is not a failure of the kernels (unless a GPU is required);
        // a driver error on a machine that has one is.
        Err(Error::NoDevice(_)) if !require_gpu => {
            println!("no backend can run kernels here; nothing to check");
            return Ok(true);
        }
        Err(_) => return Ok(false),
    };
    // A kernel that leaves part of its output unwritten reads back NaN, not stale memory.
    dev.set_poison_outputs(true);
    let scale = if args.iter().any(|a| a == "--small") {
        Scale::Small
    } else if !dev.is_gpu() {
        println!("no GPU: checking on the host emulator at small, odd shapes");
        Scale::Small
    } else {
        Scale::Realistic
    };
    println!(
        "check: {scale:?} shapes, seed {seed}\non {}\n",
        dev.describe()
    );
    println!("{}", check::header());
    // A kernel that fails to run (a fault, a race the emulator caught) fails the check.
    let rows = match check::all(&dev, scale, seed, &mut |r| println!("{}", check::line(r))) {
        Ok(rows) => rows,
        Err(e) => {
            println!("\ncheck stopped: {e}");
            return Ok(false);
        }
    };
    let failed = rows.iter().filter(|r| !r.pass()).count();
    println!("\n{} checks, {} failed", rows.len(), failed);
    Ok(failed == 0)
}

fn all_kernels() -> Vec<Kernel> {
    finetune_kernels::sparse::kernels()
        .into_iter()
        .chain(finetune_kernels::nf4::kernels())
        .chain(finetune_kernels::philox::kernels())
        .chain(finetune_kernels::lora::kernels())
        .chain(regdump::kernels())
        .collect()
}

/// The dynamic shared memory `k`'s launches ask for: LoRA's as [`lora::launch_shared_bytes`]
/// says, the NF4 wgmma GEMMs' stages (`LaunchConfig::wgmma`); the other kernels' shared memory
/// is static.
fn launch_smem(k: &Kernel) -> u32 {
    match k.module {
        "lora" => lora::launch_shared_bytes(&k.name),
        "nf4" if k.name.contains("_wgmma_") => params::FK_WGMMA_SMEM_BYTES,
        _ => 0,
    }
}

/// GPU 0, for a command that only a GPU can run (`what` says why), as a device and as the
/// CUDA device it is; or why there is none: a driver too old for the PTX, say, rather than
/// a silent fall back to the emulator.
fn gpu(what: &str) -> Result<(Device, Arc<CudaDevice>), String> {
    let cuda = CudaDevice::new(0)
        .map(Arc::new)
        .map_err(|e| format!("{what}, and there is none here: {e}"))?;
    Ok((Device::Cuda(cuda.clone()), cuda))
}

/// Every kernel as the driver's JIT compiled it: registers, local memory (spills the build
/// checks' ptxas did not predict), static and dynamic shared memory, and blocks per SM at 256
/// threads with the dynamic shared memory its launches ask for.
fn run_resources() -> Result<(), String> {
    let (_, cuda) = gpu("kernel resources are the driver's compile: they need a GPU")?;
    println!(
        "{:<40} {:>5} {:>6} {:>7} {:>8} {:>8} {:>10}",
        "kernel", "regs", "local", "smem", "dynamic", "threads", "blocks/SM"
    );
    let mut local = 0;
    for k in all_kernels() {
        let dynamic = launch_smem(&k);
        match cuda.resources(&k, 256, dynamic) {
            Ok(r) => {
                local += (r.local_bytes > 0) as usize;
                println!(
                    "{:<40} {:>5} {:>6} {:>7} {:>8} {:>8} {:>10}",
                    k.name,
                    r.registers,
                    r.local_bytes,
                    r.static_smem_bytes,
                    dynamic,
                    r.max_threads,
                    r.blocks_per_sm
                );
            }
            Err(e) => println!("{:<40} error: {e}", k.name),
        }
    }
    println!("kernels with local memory: {local}");
    Ok(())
}

fn run_regdump(args: &[String]) -> Result<(), String> {
    known_args(args, &[], &["--out", "--rcp-table"])?;
    let out = flag_value(args, "--out")?.ok_or("regdump needs --out FILE")?;
    let (dev, cuda) = gpu("the register dump records real hardware: it needs a GPU")?;
    // The MUFU.RCP table first: the dump's newest sections could end the CUDA context.
    if let Some(table) = flag_value(args, "--rcp-table")? {
        let words = regdump::record_rcp_table(&dev).map_err(|e| e.to_string())?;
        let differ: u32 = words.iter().map(|w| w.count_ones()).sum();
        std::fs::write(table, bytemuck::cast_slice::<u32, u8>(&words))
            .map_err(|e| format!("{table}: {e}"))?;
        println!("regdump: MUFU.RCP differs from the correctly rounded 1/x on {differ} of 2^23 mantissas; table in {table}");
    }
    let (dump, error) = regdump::record(&dev, cuda.target());
    std::fs::write(out, dump.to_text()).map_err(|e| format!("{out}: {e}"))?;
    println!(
        "regdump: {} sections from {} written to {out}",
        dump.sections.len(),
        dump.recorded_on
    );
    if let Some(e) = error {
        return Err(format!(
            "regdump: section {} of the plan failed, the dump stops before it: {e}",
            dump.sections.len() + 1
        ));
    }
    Ok(())
}

/// `fk bench`: every family of [`bench::families`], each in a process of its own (this
/// program again, with `--family`), at most `--seconds` (default 120) each; the rows of all,
/// and how each family's process ended, to `--json` and `--md`. With `--family NAME`, that
/// family here, its rows written to `--json` after each row (and at the end to `--md`, if
/// given); `--ceilings FILE` reuses the floors' ceilings an earlier family measured.
fn run_bench(args: &[String]) -> Result<bool, String> {
    let valued = ["--json", "--md", "--seconds", "--family", "--ceilings"];
    known_args(args, &[], &valued)?;
    let json = flag_value(args, "--json")?.ok_or("bench needs --json FILE")?;
    let md = flag_value(args, "--md")?;
    let family = flag_value(args, "--family")?;
    let (seconds, ceilings) = (
        flag_value(args, "--seconds")?,
        flag_value(args, "--ceilings")?,
    );
    match (family, seconds, ceilings) {
        (Some(_), Some(_), _) => {
            return Err("--seconds limits the families bench runs: not one (--family)".into())
        }
        (None, _, Some(_)) => return Err("--ceilings is for one family (--family NAME)".into()),
        _ => {}
    }
    if let Some(family) = family {
        bench::families::find(family).map_err(|e| e.to_string())?;
        let (dev, _) = gpu("benchmarks time GPU kernels: a family needs a GPU")?;
        let mut out = bench::Rows::writing_to(Path::new(json));
        let ran = bench::families::run(&dev, family, ceilings.map(Path::new), &mut out);
        if let Some(md) = md {
            let table = bench::to_markdown(out.rows());
            std::fs::write(md, table).map_err(|e| format!("{md}: {e}"))?;
        }
        ran.map_err(|e| e.to_string())?;
        return Ok(true);
    }
    let md = md.ok_or("bench needs --md FILE")?;
    // A family given no time at all would be stopped before it measured anything.
    let seconds = match seconds {
        Some(s) => s
            .parse::<u64>()
            .ok()
            .filter(|&n| n > 0)
            .ok_or(format!("--seconds needs a whole number above 0, not {s:?}"))?,
        None => 120,
    };
    // No family could run without a GPU: one error for all.
    probe_driver().map_err(|e| format!("benchmarks time GPU kernels: {e}"))?;
    let exe = std::env::current_exe().map_err(|e| format!("this program's path: {e}"))?;
    // Each family's rows and stderr beside the results (kept: a failed family's stderr is
    // what says why); the ceilings the first family measures, for the others.
    let dir = std::path::PathBuf::from(format!("{json}.families"));
    let ceilings = dir.join("ceilings.json");
    let _ = std::fs::remove_file(&ceilings);
    // The results so far after each family: a kill of this process keeps them.
    let write = |outcomes: &[bench::families::Outcome]| -> Result<String, Error> {
        let rows: Vec<bench::Row> = outcomes.iter().flat_map(|o| o.rows.clone()).collect();
        write_whole(Path::new(json), bench::to_json(&rows))?;
        let mut table = bench::to_markdown(&rows);
        table += &format!("\nFamilies, each in a process of its own (at most {seconds} s):\n\n");
        for o in outcomes {
            table += &(o.note() + "\n");
        }
        write_whole(Path::new(md), &table)?;
        Ok(table)
    };
    let outcomes = bench::families::run_isolated(
        &bench::families::names(),
        std::time::Duration::from_secs(seconds),
        &dir,
        &|family, rows| {
            let mut cmd = std::process::Command::new(&exe);
            cmd.args(["bench", "--family", family, "--json"])
                .arg(rows)
                .arg("--ceilings")
                .arg(&ceilings);
            cmd
        },
        &mut |so_far| write(so_far).map(|_| ()),
    )
    .map_err(|e| e.to_string())?;
    print!("{}", write(&outcomes).map_err(|e| e.to_string())?);
    Ok(outcomes
        .iter()
        .all(|o| o.ending == bench::families::Ending::Done))
}

/// `fk profile`: [`bench::profile::run`], each case's name printed before its launches (a
/// profiler's report lists the launches in the same order).
fn run_profile(args: &[String]) -> Result<(), String> {
    let family = args.first().ok_or("profile needs a family: nf4 or lora")?;
    known_args(&args[1..], &[], &[])?;
    if !bench::profile::FAMILIES.contains(&family.as_str()) {
        return Err(format!("profile: no family {family:?}: nf4 or lora"));
    }
    let (dev, _) = gpu("a profile reads a GPU's counters: it needs a GPU")?;
    bench::profile::run(&dev, family, &mut |case| println!("profile case: {case}"))
        .map_err(|e| e.to_string())
}

/// `fk quantize`: the 2-D linear weights of a bf16/f16/f32 safetensors checkpoint (one
/// file, or a model directory, sharded or not) to NF4 (bitsandbytes' layout, loadable by
/// transformers), every other tensor copied. `--include` replaces the default pattern
/// (`*.weight`); `--exclude` adds to the default ones
/// (`checkpoint::DEFAULT_EXCLUDE`: embeddings, norms, heads), which `--no-default-excludes`
/// drops; `--transpose` names weights stored `[in, out]` (GPT-2's `Conv1D`).
fn run_quantize(args: &[String]) -> Result<(), String> {
    let mut opts = QuantizeOptions::default();
    let (mut include, mut exclude, mut paths) = (Vec::new(), Vec::new(), Vec::new());
    let (mut blocksize_given, mut default_excludes) = (false, true);
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let mut value = || it.next().cloned().ok_or(format!("{arg} needs a value"));
        match arg.as_str() {
            "--blocksize" if blocksize_given => return Err("--blocksize is given twice".into()),
            "--blocksize" => {
                let v = value()?;
                opts.blocksize = v.parse().map_err(|e| format!("--blocksize {v}: {e}"))?;
                blocksize_given = true;
            }
            "--no-double-quant" => opts.double_quant = false,
            "--include" => include.push(value()?),
            "--exclude" => exclude.push(value()?),
            "--no-default-excludes" => default_excludes = false,
            "--transpose" => opts.transpose.push(value()?),
            flag if flag.starts_with("--") => return Err(format!("unknown flag {flag}\n{USAGE}")),
            path => paths.push(path),
        }
    }
    let [input, output] = paths[..] else {
        return Err(format!("quantize needs IN and OUT\n{USAGE}"));
    };
    if !include.is_empty() {
        opts.include = include;
    }
    // The user's patterns whatever the order of the flags, the defaults unless dropped.
    if !default_excludes {
        opts.exclude.clear();
    }
    opts.exclude.extend(exclude);
    let s = quantize_file(Path::new(input), Path::new(output), &opts).map_err(|e| e.to_string())?;
    for name in &s.quantized {
        println!("nf4  {name}");
    }
    println!(
        "{} tensors quantized to NF4 (blocksize {}, double quant {}), {} copied; {:.1} MB -> {:.1} MB",
        s.quantized.len(),
        opts.blocksize,
        if opts.double_quant { "on" } else { "off" },
        s.copied,
        s.bytes_before as f64 / 1e6,
        s.bytes_after as f64 / 1e6
    );
    for name in &s.carried {
        let what = if name == "config.json" {
            "with a quantization_config for the NF4 weights"
        } else {
            "copied"
        };
        println!("{name}: {what}");
    }
    if !s.left_alone.is_empty() && !s.carried.iter().any(|n| n == "config.json") {
        // transformers quantizes every linear module unless its config says otherwise.
        let modules: Vec<String> = s.skip_modules().iter().map(|m| format!("{m:?}")).collect();
        println!(
            "left as they were, {} 2-D weights: to load this file, transformers' \
             BitsAndBytesConfig needs llm_int8_skip_modules=[{}]",
            modules.len(),
            modules.join(", ")
        );
    }
    Ok(())
}

/// Writes BASE with every weight the adapter adapts replaced by `W + scale · B A` (an NF4
/// weight dequantized, merged and quantized again, as PEFT merges into bitsandbytes').
fn run_merge(args: &[String]) -> Result<(), String> {
    let [base, adapter, out] = args else {
        return Err(format!("merge needs BASE ADAPTER_DIR OUT\n{USAGE}"));
    };
    let adapter = Adapter::load(Path::new(adapter)).map_err(|e| e.to_string())?;
    let summary =
        merge_checkpoint(Path::new(base), &adapter, Path::new(out)).map_err(|e| e.to_string())?;
    for (weight, error) in &summary.requantization_error {
        println!("nf4  {weight}: merged and quantized again, relative error {error:.3e}");
    }
    for name in &summary.carried {
        println!("{name}: copied");
    }
    println!(
        "merge: {} weights merged (scale {}), {} tensors copied, written to {out}",
        summary.merged.len(),
        adapter.config.lora(None).scale(),
        summary.copied
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The dynamic shared memory `fk kernels --resources` counts per kernel: the wgmma and
    /// narrow GEMMs' (the sizes their launches ask for), none for their reduces, the other
    /// kernels and the register dumps (whose wgmma entries use static shared memory).
    #[test]
    fn resources_count_each_launchs_dynamic_shared_memory() {
        let kernels = all_kernels();
        for (name, bytes) in [
            ("lora_forward_wgmma_bf16", params::FK_WGMMA_SMEM_BYTES),
            (
                "lora_forward_down16_nf4_wgmma_f16",
                params::FK_WGMMA_SIDE_SMEM_BYTES,
            ),
            (
                "lora_forward_down32_wgmma_bf16",
                params::FK_WGMMA_SIDE_SMEM_BYTES,
            ),
            (
                "lora_backward_dx_nf4_wgmma_f16",
                params::FK_WGMMA_SMEM_BYTES,
            ),
            (
                "lora_backward_dx_v32_nf4_wgmma_bf16",
                params::FK_WGMMA_SIDE_ACROSS_SMEM_BYTES,
            ),
            ("nf4_gemm_dx_wgmma_bf16", params::FK_WGMMA_SMEM_BYTES),
            ("lora_down_bf16", params::FK_NARROW_SMEM_BYTES),
            ("lora_down_k64_f16", params::FK_NARROW_WIDE_SMEM_BYTES),
            ("lora_grad_b_f16", params::FK_NARROW_SMEM_BYTES),
            ("lora_down_reduce_bf16", 0),
            ("lora_backward_v_reduce_f16", 0),
            ("regdump_wgmma_bf16", 0),
            ("nf4_gemv_mma_bf16_m8", 0),
        ] {
            let k = kernels.iter().find(|k| k.name == name);
            assert_eq!(k.map(launch_smem), Some(bytes), "{name}");
        }
    }
}
