//! `fk`'s own behaviour (src/bin/fk.rs): a mistyped argument is an error before anything
//! runs; `fk info` says why kernels run on the emulator; `FK_REQUIRE_GPU=1 fk check` fails,
//! rather than checking on the emulator, where there is no GPU. The commands' work is tested
//! with the library it calls (tests/nf4_checkpoint.rs, lora_adapter.rs, shards.rs).

use finetune_kernels::Device;
use std::process::{Command, Output};

fn fk(args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fk"))
        .args(args)
        .envs(env.iter().copied())
        .output()
        .unwrap()
}

fn text(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

/// Each names the argument at fault (the last one), before anything runs.
#[test]
fn unknown_arguments_are_errors() {
    for args in [
        &["check", "--smal"][..],
        &["check", "--seed"],
        &["info", "junk"],
        &["kernels", "--resource"],
        &["bench", "--json", "x.json", "--mdd"],
        &["regdump", "--out"],
        &["profile", "nf4", "extra"],
        &["quantize", "a", "b", "--blocksize"],
        &["nonsense"],
    ] {
        let out = fk(args, &[]);
        let said = text(&out);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {said}");
        let named = args.last().unwrap();
        assert!(
            said.starts_with("fk: ") && said.lines().next().unwrap().contains(named),
            "{args:?}: {said}"
        );
        assert!(!said.contains("check:"), "{args:?}: {said}");
    }
}

/// `--no-default-excludes` drops the default patterns, not the user's own `--exclude`s,
/// whichever comes first: lm_head (a default exclude) named by --exclude stays as it is.
#[test]
fn no_default_excludes_keeps_the_users_excludes() {
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("cli");
    std::fs::create_dir_all(&dir).unwrap();
    let input = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/nf4/cpu/checkpoint_input.safetensors"
    );
    let out = dir.join("out.safetensors");
    let out = out.to_str().unwrap();
    let (exclude, drop) = (["--exclude", "*lm_head*"], ["--no-default-excludes"]);
    for flags in [
        [&exclude[..], &drop].concat(),
        [&drop[..], &exclude].concat(),
    ] {
        let said = fk(&[&["quantize", input, out][..], &flags].concat(), &[]);
        assert!(said.status.success(), "{flags:?}: {}", text(&said));
        let said = text(&said);
        assert!(!said.contains("nf4  lm_head.weight"), "{flags:?}: {said}");
        // The default excludes did go: the embedding is quantized.
        assert!(
            said.contains("nf4  model.embed_tokens.weight"),
            "{flags:?}: {said}"
        );
    }
}

/// Arguments that cannot go together, a family that does not exist, a flag's value that
/// cannot be used or a flag given twice (whose second value had been ignored) are said
/// before anything looks for a GPU (which would be the error here otherwise).
#[test]
fn bad_combinations_are_named_before_the_gpu_is_looked_for() {
    let bench = ["bench", "--json", "x.json", "--md", "x.md"];
    for (args, named) in [
        (&["profile", "nf5"][..], "\"nf5\""),
        (&[&bench[..], &["--seconds", "abc"]].concat(), "--seconds"),
        (&[&bench[..], &["--seconds", "0"]].concat(), "--seconds"),
        (&[&bench[..], &["--json", "y.json"]].concat(), "--json"),
        (&["regdump", "--out", "a", "--out", "b"], "--out"),
        (
            &[
                "quantize",
                "--blocksize",
                "64",
                "--blocksize",
                "32",
                "in",
                "out",
            ],
            "--blocksize",
        ),
        (
            &[
                "bench",
                "--json",
                "x.json",
                "--family",
                "nf4",
                "--seconds",
                "9",
            ],
            "--seconds",
        ),
        (
            &[
                "bench",
                "--json",
                "x.json",
                "--md",
                "x.md",
                "--ceilings",
                "c.json",
            ],
            "--ceilings",
        ),
    ] {
        let out = fk(args, &[]);
        let said = text(&out);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {said}");
        assert!(
            said.contains(named) && !said.contains("GPU"),
            "{args:?}: {said}"
        );
    }
}

/// An argument that is not UTF-8 (a file name in another encoding) is an error that says
/// so; `std::env::args` had panicked on it (exit status 101).
#[cfg(unix)]
#[test]
fn arguments_that_are_not_utf8_are_errors() {
    use std::os::unix::ffi::OsStrExt;
    let latin1 = std::ffi::OsStr::from_bytes(b"caf\xe9.safetensors");
    let out = Command::new(env!("CARGO_BIN_EXE_fk"))
        .arg("quantize")
        .arg(latin1)
        .arg("out.safetensors")
        .output()
        .unwrap();
    let said = text(&out);
    assert_eq!(out.status.code(), Some(2), "{said}");
    assert!(said.contains("is not UTF-8"), "{said}");
}

#[test]
fn no_gpu_is_said_and_a_required_one_is_not_replaced_by_the_emulator() {
    let Err(why) = Device::cuda(0) else {
        return; // A GPU here: nothing falls back.
    };
    let out = fk(&["info"], &[]);
    assert!(out.status.success());
    assert!(
        text(&out).contains(&format!("no GPU: {why}")),
        "{}",
        text(&out)
    );
    let out = fk(&["check", "--small"], &[("FK_REQUIRE_GPU", "1")]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("FK_REQUIRE_GPU=1"), "{}", text(&out));
}
