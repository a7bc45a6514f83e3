//! `fk bench`'s families, each run in a process of its own with a time limit. A GPU fault
//! ends its process's CUDA context, and with it every later launch of that process; a kernel
//! that never returns holds its process until it is killed. Either way the other families
//! still run, and the family itself keeps the rows it had measured ([`Rows::writing_to`]):
//! a GPU check, rare and short, loses at most one family's tail to one bad kernel.

use super::{cublas_rows, lora, measure_ceilings, nf4, sparse};
use super::{Ceilings, GpuTimer, Row, Rows};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::files::write_whole;
use crate::lora::LoraPath;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// A family's benchmarks: its rows into the last argument as they are measured.
type Family = fn(&Device, &mut GpuTimer, &Ceilings, &mut Rows) -> Result<()>;

/// The families, in the order `fk bench` runs them: the baselines first (the first family
/// measures the ceilings every floor is computed from), the LoRA paths oldest first.
pub const FAMILIES: [(&str, Family); 8] = [
    ("baseline", cublas_rows),
    ("nf4", nf4::rows),
    ("nf4_wgmma", nf4::wgmma_rows),
    ("lora_extended", |d, t, c, o| {
        lora::path_rows(d, t, c, LoraPath::Extended, o)
    }),
    ("lora_fused", |d, t, c, o| {
        lora::path_rows(d, t, c, LoraPath::Fused, o)
    }),
    ("lora_fused_wgmma", |d, t, c, o| {
        lora::path_rows(d, t, c, LoraPath::FusedWgmma, o)
    }),
    ("lora_variants", lora::variant_rows),
    ("sparse", sparse::rows),
];

/// The family named `name`, or an error naming those there are.
pub fn find(name: &str) -> Result<Family> {
    FAMILIES
        .iter()
        .find(|(n, _)| *n == name)
        .map(|&(_, f)| f)
        .ok_or_else(|| Error::InvalidArgument {
            what: "bench family",
            why: format!("{name:?} is none of {}", names().join(", ")),
        })
}

/// The families' names, in [`FAMILIES`]' order.
pub fn names() -> Vec<&'static str> {
    FAMILIES.iter().map(|&(n, _)| n).collect()
}

/// Runs `family` in this process, its rows into `out` as they are measured. Its floors come
/// from the ceilings in `ceilings` where that file holds them; otherwise they are measured,
/// and written there for the families after it.
pub fn run(dev: &Device, family: &str, ceilings: Option<&Path>, out: &mut Rows) -> Result<()> {
    let family = find(family)?;
    let mut timer = GpuTimer::new(dev)?;
    let known = ceilings
        .and_then(|p| std::fs::read_to_string(p).ok())
        .and_then(|text| Ceilings::from_json(&text));
    let c = match known {
        Some(c) => c,
        None => {
            let c = measure_ceilings(dev, &mut timer)?;
            if let Some(path) = ceilings {
                write_whole(path, c.to_json())?;
            }
            c
        }
    };
    println!(
        "ceilings: copy {:.3} TB/s (read+write), cuBLAS bf16 {}",
        c.copy_bytes_per_s * 1e-12,
        c.bf16_flops_per_s
            .map_or("unavailable".to_string(), |r| format!(
                "{:.1} TFLOP/s",
                r * 1e-12
            ))
    );
    family(dev, &mut timer, &c, out)
}

/// How one family's process ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Ending {
    /// It exited with status 0.
    Done,
    /// It exited otherwise (None: ended by a signal); its last line on stderr.
    Failed(Option<i32>, String),
    /// It was still running at the time limit, and was killed.
    Killed,
}

/// One family's rows and how its process ended.
#[derive(Debug)]
pub struct Outcome {
    /// The family's name, as in [`FAMILIES`].
    pub family: String,
    /// The rows its process wrote before it ended (none if it wrote no readable file).
    pub rows: Vec<Row>,
    /// How its process ended.
    pub ending: Ending,
    /// Wall-clock seconds from the process's start until its rows were read back.
    pub seconds: f64,
}

impl Outcome {
    /// A line for the results: the family, its rows, its time and how it ended.
    pub fn note(&self) -> String {
        let ended = match &self.ending {
            Ending::Done => "done".to_string(),
            Ending::Failed(code, last) => format!(
                "**failed** ({}): {last}",
                code.map_or("killed by a signal".to_string(), |c| format!("exit {c}"))
            ),
            Ending::Killed => "**killed at its time limit**".to_string(),
        };
        format!(
            "- {}: {} rows in {:.0} s, {ended}",
            self.family,
            self.rows.len(),
            self.seconds
        )
    }
}

/// Runs each of `families` in a process of its own, one after another: `child(family, json)`
/// makes the command that runs it and writes its rows to `json` as [`Rows::writing_to`] does.
/// A process still running after `limit` is killed. Its stderr is kept in `dir` (with its
/// rows) and passed on to this process's. The families' rows come back whatever their
/// processes did, those of a process that failed or was killed included; `each` sees the
/// outcomes so far after every family (to write them out, in case this process is killed).
pub fn run_isolated(
    families: &[&str],
    limit: Duration,
    dir: &Path,
    child: &dyn Fn(&str, &Path) -> Command,
    each: &mut dyn FnMut(&[Outcome]) -> Result<()>,
) -> Result<Vec<Outcome>> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let mut outcomes = Vec::new();
    for &family in families {
        let json = dir.join(format!("{family}.json"));
        let err = dir.join(format!("{family}.stderr"));
        // A file left by an earlier run must not pass for this one's rows.
        let _ = std::fs::remove_file(&json);
        let start = Instant::now();
        let stderr = std::fs::File::create(&err).map_err(|e| Error::io(&err, e))?;
        let mut proc = child(family, &json)
            .stderr(stderr)
            .spawn()
            .map_err(|e| Error::Io {
                path: format!("the process of bench family {family}"),
                why: e.to_string(),
            })?;
        let status = loop {
            if let Some(status) = proc.try_wait().map_err(|e| Error::io(&json, e))? {
                break Some(status);
            }
            if start.elapsed() >= limit {
                let _ = proc.kill();
                let _ = proc.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let said = std::fs::read_to_string(&err).unwrap_or_default();
        eprint!("{said}");
        let last = said.lines().rev().find(|l| !l.trim().is_empty());
        let ending = match status {
            None => Ending::Killed,
            Some(s) if s.success() => Ending::Done,
            Some(s) => Ending::Failed(s.code(), last.unwrap_or("(nothing)").to_string()),
        };
        let rows = std::fs::read_to_string(&json)
            .ok()
            .and_then(|text| serde_json::from_str::<Vec<serde_json::Value>>(&text).ok())
            .map(|rows| rows.iter().filter_map(Row::from_json).collect())
            .unwrap_or_default();
        outcomes.push(Outcome {
            family: family.to_string(),
            rows,
            ending,
            seconds: start.elapsed().as_secs_f64(),
        });
        each(&outcomes)?;
    }
    Ok(outcomes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::{to_json, Scale, Stats};
    use rand::Rng;
    use std::collections::HashSet;

    /// A fresh directory for one test's files.
    fn scratch(test: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "fk-bench-{test}-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// `n` rows of `family` with random figures, some against a baseline; the ceilings
    /// without a cuBLAS rate or with one.
    fn random_rows(family: &str, n: usize) -> Vec<Row> {
        let mut rng = rand::rng();
        let c = Ceilings {
            copy_bytes_per_s: rng.random_range(1e12..5e12),
            bf16_flops_per_s: rng.random_bool(0.5).then(|| rng.random_range(1e14..1e15)),
        };
        (0..n)
            .map(|i| {
                let t = Stats {
                    median_us: rng.random_range(1.0..900.0),
                    reps: 50,
                };
                let row = Row::new(
                    family,
                    &format!("{family}_kernel_{i} ▸ part"),
                    "8192x4096→4096 r16",
                    &t,
                    rng.random_range(0.0..1e9),
                    rng.random_range(0.0..1e12),
                    &c,
                );
                if rng.random_bool(0.5) {
                    row.with_baseline("cuBLAS bf16, same shape", rng.random_range(1.0..900.0))
                } else {
                    row
                }
            })
            .collect()
    }

    #[test]
    fn rows_and_ceilings_read_back_as_written() {
        let rows = random_rows("lora", 9);
        let text = to_json(&rows);
        let values: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap();
        let back: Vec<Row> = values.iter().filter_map(Row::from_json).collect();
        assert_eq!(to_json(&back), text);
        assert!(Row::from_json(&serde_json::json!({"family": "lora"})).is_none());
        for flops in [None, Some(6.7e14)] {
            let c = Ceilings {
                copy_bytes_per_s: 4.18e12,
                bf16_flops_per_s: flops,
            };
            assert_eq!(Ceilings::from_json(&c.to_json()), Some(c));
        }
        assert_eq!(Ceilings::from_json("{\"copy\": 1}"), None);
    }

    /// Each row written out as it comes: the file holds every row pushed so far, whole.
    #[test]
    fn rows_are_written_after_each_row() {
        let dir = scratch("rows");
        let path = dir.join("rows.json");
        let rows = random_rows("nf4", 5);
        let mut out = Rows::writing_to(&path);
        for (i, row) in rows.iter().enumerate() {
            out.push(row.clone()).unwrap();
            let text = std::fs::read_to_string(&path).unwrap();
            assert_eq!(text, to_json(&rows[..=i]));
        }
        out.extend_extra(Err(Error::Emulator("a planted failure".into())), "planted")
            .unwrap();
        assert_eq!(
            out.rows().len(),
            rows.len(),
            "an extra's failure costs only its rows"
        );
        assert_eq!(
            out.failed_extras(),
            ["no planted rows: emulator: a planted failure"]
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Families in processes of their own: one that finishes, one that fails, one that never
    /// ends (killed at the limit, not waited for), one that writes nothing (a file left by an
    /// earlier run must not pass for its rows). Every row each wrote comes back, in order,
    /// each family's ending told apart.
    #[test]
    fn a_family_that_fails_or_hangs_keeps_its_rows_and_the_others_run() {
        let dir = scratch("isolated");
        let families = ["done", "failed", "hangs", "silent"];
        let mut written = Vec::new();
        for (family, n) in families.iter().zip([3, 2, 1, 0]) {
            let rows = random_rows(family, n);
            std::fs::write(dir.join(format!("{family}.rows")), to_json(&rows)).unwrap();
            written.push(rows);
        }
        let stale = random_rows("stale", 2);
        std::fs::write(dir.join("silent.json"), to_json(&stale)).unwrap();
        let scripts = dir.clone();
        let child = move |family: &str, json: &Path| {
            let script = match family {
                "done" => "cp \"$1\" \"$2\"",
                "failed" => "cp \"$1\" \"$2\"; echo a warning >&2; echo 'a GPU fault' >&2; exit 3",
                "hangs" => "cp \"$1\" \"$2\"; exec sleep 60",
                _ => "exit 0",
            };
            let mut cmd = Command::new("sh");
            cmd.args(["-c", script, "sh"])
                .arg(scripts.join(format!("{family}.rows")))
                .arg(json);
            cmd
        };
        let start = Instant::now();
        let mut seen = Vec::new();
        let mut each = |so_far: &[Outcome]| {
            seen.push(so_far.len());
            Ok(())
        };
        let limit = Duration::from_secs(2);
        let outcomes = run_isolated(&families, limit, &dir, &child, &mut each).unwrap();
        assert_eq!(seen, [1, 2, 3, 4]);
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the hung family was waited for"
        );
        let endings: Vec<Ending> = outcomes.iter().map(|o| o.ending.clone()).collect();
        assert_eq!(
            endings,
            [
                Ending::Done,
                Ending::Failed(Some(3), "a GPU fault".into()),
                Ending::Killed,
                Ending::Done
            ]
        );
        for ((o, family), rows) in outcomes.iter().zip(families).zip(&written) {
            assert_eq!(o.family, family);
            assert_eq!(to_json(&o.rows), to_json(rows), "{family}'s rows");
        }
        assert!(outcomes[1]
            .note()
            .contains("**failed** (exit 3): a GPU fault"));
        assert!(outcomes[2].note().contains("killed at its time limit"));
        assert!(outcomes[2].seconds >= 2.0);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Whether `names` holds the rows selector `sel` of bench/predictions.json reads (a
    /// PyTorch row counts as there; `excused` rows too, but an `any` needs one of its rows
    /// made unless all are excused): where it names a shape, a row of that shape at the GPU
    /// check's scale ([`shape_key`]), and where it reads a `field` other than the time, a row
    /// with that figure ([`field_key`]).
    fn selects(
        sel: &serde_json::Value,
        names: &HashSet<String>,
        excused: &dyn Fn(&str) -> bool,
    ) -> bool {
        let all = |key: &str, excused: &dyn Fn(&str) -> bool| {
            sel[key].as_array().map(|a| {
                a.iter()
                    .map(|s| selects(s, names, excused))
                    .collect::<Vec<_>>()
            })
        };
        if let Some(k) = sel["kernel"].as_str() {
            let key = match sel["field"].as_str() {
                Some(field) => field_key(k, field),
                None => k.to_string(),
            };
            let shaped = sel["shape"]
                .as_str()
                .is_none_or(|shape| names.contains(&shape_key(k, shape)));
            (names.contains(&key) && shaped) || excused(k)
        } else if let Some(made) = all("any", &|_| false) {
            made.contains(&true) || all("any", excused).is_some_and(|e| !e.contains(&false))
        } else if let Some(sum) = all("sum", excused) {
            !sum.contains(&false)
        } else {
            sel["torch"].is_string() || sel == "baseline"
        }
    }

    /// A row of `kernel` that carries `field` (not just its time), as [`selects`] looks it up.
    fn field_key(kernel: &str, field: &str) -> String {
        format!("{kernel} ({field})")
    }

    /// A row of `kernel` and `shape` (at the GPU check's scale), as [`selects`] looks it up.
    fn shape_key(kernel: &str, shape: &str) -> String {
        format!("{kernel} @ {shape}")
    }

    /// A shape the emulator's benchmarks wrote at [`Scale::SMALL`] as the GPU check writes it
    /// at [`Scale::BENCH`]: the LoRA layer's, the NF4 weight's both ways, and the GEMMs' most
    /// rows.
    fn at_bench_scale(shape: &str) -> String {
        let (s, b) = (Scale::SMALL, Scale::BENCH);
        let lora = |at: &Scale| format!("{}x{}→{}", at.lora.0, at.lora.1, at.lora.1);
        let wide = |at: &Scale| format!("{}→{}", at.nf4.1, at.nf4.0);
        let tall = |at: &Scale| format!("{}→{}", at.nf4.0, at.nf4.1);
        let shape = shape.replace(&lora(&s), &lora(&b));
        let shape = shape
            .replace(&wide(&s), &wide(&b))
            .replace(&tall(&s), &tall(&b));
        match shape.strip_prefix(&format!("{}x", s.nf4_tokens)) {
            Some(rest) => format!("{}x{rest}", b.nf4_tokens),
            None => shape,
        }
    }

    /// Every family runs on the emulator at `Scale::SMALL` (a GPU session is too scarce to
    /// find a broken family in), and makes the rows of every target, prediction and decision
    /// of bench/predictions.json: a renamed row, or a breakdown without the launch a row looks
    /// for, fails here, and so does a shape the GPU check would not write (the emulator's
    /// shapes taken to the GPU check's scale). (Rows through cuBLAS, which the emulator has
    /// not, are excused: the Extended path's and dequantize + cuBLAS's.)
    #[test]
    fn every_family_runs_and_makes_the_rows_predictions_name() {
        let Some(dev) = crate::testing::emulators().into_iter().next() else {
            eprintln!("note: no emulator selected: the benchmarks' families are not run");
            return;
        };
        let cublas = dev.has_cublas();
        let mut made = HashSet::new();
        for family in names() {
            let mut out = Rows::new();
            run(&dev, family, None, &mut out).unwrap_or_else(|e| panic!("{family}: {e}"));
            let none_expected = family == "lora_extended" && !cublas;
            assert!(
                !out.rows().is_empty() || none_expected,
                "{family} made no rows"
            );
            assert!(
                out.failed_extras().is_empty(),
                "{family}: {:?}",
                out.failed_extras()
            );
            made.extend(out.rows().iter().map(|r| r.kernel.clone()));
            made.extend(
                out.rows()
                    .iter()
                    .filter(|r| r.saved_bytes.is_some())
                    .map(|r| field_key(&r.kernel, "saved_bytes")),
            );
            made.extend(
                out.rows()
                    .iter()
                    .map(|r| shape_key(&r.kernel, &at_bench_scale(&r.shape))),
            );
        }
        // Rows through cuBLAS: the Extended path's, and dequantize + cuBLAS.
        let excused = |k: &str| (k.starts_with("lora_extended") || k.contains("cublas")) && !cublas;
        let spec: serde_json::Value =
            serde_json::from_str(include_str!("../../bench/predictions.json")).unwrap();
        let entries = ["targets", "predictions"].map(|k| spec[k].as_array().unwrap().clone());
        assert!(entries.iter().all(|e| e.len() > 10));
        for e in entries.iter().flatten() {
            let rows = selects(&e["row"], &made, &excused);
            let vs = e.get("vs").is_none_or(|vs| selects(vs, &made, &excused));
            assert!(rows && vs, "no family makes the rows of {e}");
        }
        for d in spec["decisions"].as_array().unwrap() {
            for o in d["options"].as_array().unwrap() {
                assert!(
                    selects(&o["row"], &made, &excused),
                    "no family makes the rows of {o}"
                );
            }
        }
    }

    #[test]
    fn an_unknown_family_is_a_typed_error() {
        let err = find("gemv").map(|_| ()).unwrap_err();
        assert!(err.to_string().contains("none of baseline, nf4"), "{err}");
        for name in names() {
            assert!(find(name).is_ok());
        }
    }
}
