//! `copilot-trainer train` end to end on the CI's tiny real model (SmolLM2-135M, llama architecture): a recipe in,
//! a PEFT adapter, checkpoints, a log and training_summary.json out; a run stopped and `--resume`d ends with the
//! same adapter as one that went straight through; the adapter exports to a GGUF with a model card; bad recipes
//! are refused before any work.
use std::path::{Path, PathBuf};
use std::process::Command;

fn model() -> PathBuf {
    let p = std::env::var_os("COPILOT_TEST_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/lib/copilot/models/smollm2-135m-instruct-q4_1.gguf"));
    assert!(
        p.is_file(),
        "test model {} is missing: run scripts/fetch-model --tiny (or set COPILOT_TEST_MODEL)",
        p.display()
    );
    p
}

fn workdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("copilot-train-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Short prepared rows (prompt + completion), as `data prepare` writes them.
fn rows(dir: &Path) -> (PathBuf, PathBuf) {
    let tables = ["singer", "concert", "stadium", "team", "player", "course"];
    let mut train = String::new();
    for (i, t) in tables.iter().enumerate() {
        for (q, a) in [("How many rows are in", "SELECT count(*) FROM"), ("List everything in", "SELECT * FROM")] {
            let row = serde_json::json!({
                "prompt": format!("CREATE TABLE {t} (id INT)\nQuestion: {q} {t}?\nSQL: "),
                "completion": format!("{a} {t};"),
                "context": format!("CREATE TABLE {t} (id INT)"),
                "n": i,
            });
            train.push_str(&format!("{row}\n"));
        }
    }
    let val = "{\"prompt\": \"CREATE TABLE city (id INT)\\nQuestion: How many rows are in city?\\nSQL: \", \"completion\": \"SELECT count(*) FROM city;\"}\n";
    let (tp, vp) = (dir.join("train.jsonl"), dir.join("val.jsonl"));
    std::fs::write(&tp, train).unwrap();
    std::fs::write(&vp, val).unwrap();
    (tp, vp)
}

fn recipe(dir: &Path, out: &Path, extra_train: &str) -> PathBuf {
    let (tp, vp) = rows(dir);
    let text = format!(
        r#"
[model]
base = "{}"
base_model_id = "HuggingFaceTB/SmolLM2-135M-Instruct"
base_mode = "f32"
[data]
train = "{}"
val = "{}"
max_seq_len = 64
dataset_id = "test/rows"
[lora]
rank = 4
alpha = 8
dropout = 0.1
targets = ["q", "v"]
[train]
epochs = 2
batch_size = 3
learning_rate = 1e-3
warmup_steps = 1
seed = 11
{extra_train}
[checkpoint]
every = 2
keep = 10
[validation]
every = 2
[output]
dir = "{}"
"#,
        model().display(),
        tp.display(),
        vp.display(),
        out.display()
    );
    let p = dir.join("recipe.toml");
    std::fs::write(&p, text).unwrap();
    p
}

fn trainer(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_copilot-trainer")).args(args).output().unwrap()
}

fn adapter_bytes(dir: &Path) -> Vec<u8> {
    std::fs::read(dir.join("adapter_model.safetensors")).unwrap()
}

#[test]
fn train_writes_an_adapter_and_resume_continues_exactly() {
    let dir = workdir("resume");
    let straight = dir.join("straight");
    let r = recipe(&dir, &straight, "");
    let run = trainer(&["train", "--config", r.to_str().unwrap()]);
    assert!(run.status.success(), "train failed: {}", String::from_utf8_lossy(&run.stderr));

    // 12 rows, 2 epochs, 3 a step: 8 steps; checkpoints every 2.
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(straight.join("training_summary.json")).unwrap()).unwrap();
    assert_eq!(summary["steps"], 8);
    assert_eq!(summary["train_rows"], 12);
    assert!(summary["tokens_seen"].as_u64().unwrap() > 0);
    assert!(summary["wall_s"].as_f64().unwrap() > 0.0);
    assert!(summary["peak_rss_bytes"].as_u64().unwrap() > 100_000_000, "the model alone is > 100 MB");
    assert_eq!(summary["lr_schedule"]["peak"], 1e-3);
    assert!(summary["hardware"]["cpu"].is_string());
    let (first, last) =
        (summary["train_loss_first"].as_f64().unwrap(), summary["train_loss_last10_mean"].as_f64().unwrap());
    assert!(last < first, "training lowered the loss: {first} → {last}");
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(straight.join("adapter/adapter_config.json")).unwrap()).unwrap();
    assert_eq!(cfg["base_model_name_or_path"], "HuggingFaceTB/SmolLM2-135M-Instruct");
    assert_eq!(cfg["peft_type"], "LORA");
    assert!(straight.join("loss.png").is_file());
    let log = std::fs::read_to_string(straight.join("train_log.jsonl")).unwrap();
    assert_eq!(log.lines().filter(|l| l.contains("\"loss\"")).count(), 8);
    assert_eq!(log.lines().filter(|l| l.contains("val_loss")).count(), 5, "before training and every 2 steps");
    for s in [2, 4, 6, 8] {
        assert!(straight.join(format!("checkpoints/step-{s:06}/optimizer.safetensors")).is_file(), "checkpoint {s}");
    }

    // The same recipe cut at step 5 with --stop-at (the schedule stays the recipe's 8 steps), then resumed.
    let resumed = dir.join("resumed");
    let r2 = recipe(&dir, &resumed, "");
    let cut = trainer(&["train", "--config", r2.to_str().unwrap(), "--stop-at", "5"]);
    assert!(cut.status.success(), "stop-at failed: {}", String::from_utf8_lossy(&cut.stderr));
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(resumed.join("training_summary.json")).unwrap()).unwrap();
    assert_eq!((summary["steps"].as_u64(), summary["stopped_at"].as_u64()), (Some(5), Some(5)));
    assert_eq!(summary["total_steps_planned"], 8, "--stop-at keeps the schedule");
    assert!(resumed.join("checkpoints/step-000005/state.json").is_file(), "the cut step is checkpointed");
    assert!(!resumed.join("checkpoints/step-000006").exists());
    let log = std::fs::read_to_string(resumed.join("train_log.jsonl")).unwrap();
    assert!(log.lines().last().unwrap().contains("\"step\":5,\"val_loss\""), "the cut step is validated");
    std::fs::remove_file(resumed.join("train_log.jsonl")).unwrap();
    let run = trainer(&["train", "--config", r2.to_str().unwrap(), "--resume"]);
    assert!(run.status.success(), "resume failed: {}", String::from_utf8_lossy(&run.stderr));
    let last_straight = straight.join("checkpoints/step-000008");
    let last_resumed = resumed.join("checkpoints/step-000008");
    assert_eq!(adapter_bytes(&last_straight), adapter_bytes(&last_resumed), "steps 5–8 repeat exactly after --resume");
    let log = std::fs::read_to_string(resumed.join("train_log.jsonl")).unwrap();
    assert_eq!(log.lines().filter(|l| l.contains("\"loss\"")).count(), 3, "only steps 6–8 ran again");

    // Export: merged GGUF + model card with the recipe's facts, and the adapter to ship, stored in f16.
    let export = |adapter: &Path, out: &Path, extra: &[&str]| {
        std::fs::create_dir_all(out.parent().unwrap()).unwrap();
        let base = model();
        let mut args = vec![
            "export",
            "--base",
            base.to_str().unwrap(),
            "--adapter",
            adapter.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let run = trainer(&args);
        assert!(run.status.success(), "export failed: {}", String::from_utf8_lossy(&run.stderr));
    };
    let out = dir.join("export/tuned.gguf");
    let shipped = dir.join("shipped");
    export(&straight.join("adapter"), &out, &["--save-adapter", shipped.to_str().unwrap()]);
    let card = std::fs::read_to_string(dir.join("export/README.md")).unwrap();
    let size = |d: &Path| std::fs::metadata(d.join("adapter_model.safetensors")).unwrap().len();
    assert!(size(&shipped) * 10 < size(&straight.join("adapter")) * 6, "the shipped copy is stored in f16");
    // The merge is deterministic, and `out` folded in the shipped copy itself: merging that folder again gives the
    // same bytes, so a merged model can be pinned by its sha256.
    let again = dir.join("export/again.gguf");
    export(&shipped, &again, &[]);
    assert!(std::fs::read(&out).unwrap() == std::fs::read(&again).unwrap(), "two exports differ");
    let refused = trainer(&[
        "export",
        "--base",
        model().to_str().unwrap(),
        "--adapter",
        shipped.to_str().unwrap(),
        "--out",
        dir.join("export/x.gguf").to_str().unwrap(),
        "--save-adapter",
        shipped.to_str().unwrap(),
    ]);
    assert!(!refused.status.success(), "saving over the adapter being read is refused");
    assert!(String::from_utf8_lossy(&refused.stderr).contains("is the adapter being read"));
    fetch_model_merges_an_adapter_and_checks_the_result(&dir, &shipped, &out);
    assert!(card.starts_with("---\n"), "YAML front matter");
    for want in [
        "base_model: \"HuggingFaceTB/SmolLM2-135M-Instruct\"",
        "datasets:\n- \"test/rows\"",
        "license: ",
        "copilot.ask(",
        "hf upload",
        "| training rows | 12 |",
    ] {
        assert!(card.contains(want), "model card lacks {want:?}:\n{card}");
    }
}

/// `scripts/fetch-model` on a table whose tuned row folds `adapter` into the tiny model: it writes exactly the
/// exported `want`; a row recording another sha256 fails and leaves no file; an adapter folder that is missing fails.
fn fetch_model_merges_an_adapter_and_checks_the_result(dir: &Path, adapter: &Path, want: &Path) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let models = dir.join("models");
    std::fs::create_dir_all(&models).unwrap();
    let tiny = model();
    let tiny_name = tiny.file_name().unwrap().to_str().unwrap().to_string();
    if std::fs::hard_link(&tiny, models.join(&tiny_name)).is_err() {
        std::fs::copy(&tiny, models.join(&tiny_name)).unwrap();
    }
    let table = std::fs::read_to_string(root.join("scripts/models.tsv")).unwrap();
    let tiny_row = table.lines().find(|l| l.starts_with("tiny\t")).unwrap();
    let bytes = std::fs::read(want).unwrap();
    let sha = {
        let out = Command::new("sha256sum").arg(want).output().unwrap();
        String::from_utf8(out.stdout).unwrap().split_whitespace().next().unwrap().to_string()
    };
    let a = adapter.display();
    let tsv = format!(
        "{tiny_row}\ntuned\ttuned.gguf\t{sha}\t{n}\tmerge:tiny+{a}\t-\nwrong\twrong.gguf\t{z}\t{n}\tmerge:tiny+{a}\t-\n\
         gone\tgone.gguf\t{sha}\t{n}\tmerge:tiny+{a}/nowhere\t-\nalias\t=tuned\n",
        n = bytes.len(),
        z = "0".repeat(64),
    );
    std::fs::write(dir.join("models.tsv"), tsv).unwrap();
    let fetch = |name: &str| {
        Command::new(root.join("scripts/fetch-model"))
            .arg(format!("--{name}"))
            .env("COPILOT_MODELS_TSV", dir.join("models.tsv"))
            .env("COPILOT_MODEL_DIR", &models)
            .env("COPILOT_TRAINER", env!("CARGO_BIN_EXE_copilot-trainer"))
            .output()
            .unwrap()
    };
    let run = fetch("tuned");
    assert!(run.status.success(), "fetch-model --tuned: {}", String::from_utf8_lossy(&run.stderr));
    assert!(std::fs::read(models.join("tuned.gguf")).unwrap() == bytes, "the merged file is the exported one");
    let run = fetch("alias");
    assert!(run.status.success(), "an alias row resolves");
    assert!(String::from_utf8_lossy(&run.stdout).contains("present, sha256 verified"));
    let run = fetch("wrong");
    assert!(!run.status.success(), "a merge with another sha256 is refused");
    assert!(String::from_utf8_lossy(&run.stderr).contains("sha256"), "{}", String::from_utf8_lossy(&run.stderr));
    assert!(!models.join("wrong.gguf").exists(), "nothing installed");
    let run = fetch("gone");
    assert!(!run.status.success());
    assert!(String::from_utf8_lossy(&run.stderr).contains("no PEFT adapter"));
    assert_eq!(fetch("nosuch").status.code(), Some(2));
}

#[test]
fn shared_prefix_steps_take_one_schema_each_and_resume_exactly() {
    let dir = workdir("share");
    let share = |out: &Path| {
        let r = recipe(&dir, out, "");
        let text =
            std::fs::read_to_string(&r).unwrap().replace("max_seq_len = 64", "max_seq_len = 64\nshare_prefix = true");
        std::fs::write(&r, text).unwrap();
        r
    };
    let straight = dir.join("straight");
    let r = share(&straight);
    let run = trainer(&["train", "--config", r.to_str().unwrap()]);
    assert!(run.status.success(), "train failed: {}", String::from_utf8_lossy(&run.stderr));
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(straight.join("training_summary.json")).unwrap()).unwrap();
    // Six schemas of two rows each, batch 3: one step per schema and epoch, 12 steps in 2 epochs.
    assert_eq!(summary["steps"], 12);
    assert_eq!(summary["share_prefix"], true);
    let (seen, computed) = (summary["tokens_seen"].as_u64().unwrap(), summary["computed_tokens"].as_u64().unwrap());
    assert!(computed < seen, "the schema is computed once per step: {computed} computed of {seen}");
    let log = std::fs::read_to_string(straight.join("train_log.jsonl")).unwrap();
    let steps: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|v: &serde_json::Value| v["loss"].is_number())
        .collect();
    assert!(steps.iter().all(|v| v["computed_tokens"].as_u64() < v["tokens"].as_u64()), "{log}");

    let resumed = dir.join("resumed");
    let r2 = share(&resumed);
    assert!(trainer(&["train", "--config", r2.to_str().unwrap()]).status.success());
    for s in [8, 10, 12] {
        std::fs::remove_dir_all(resumed.join(format!("checkpoints/step-{s:06}"))).unwrap();
    }
    let run = trainer(&["train", "--config", r2.to_str().unwrap(), "--resume"]);
    assert!(run.status.success(), "resume failed: {}", String::from_utf8_lossy(&run.stderr));
    assert_eq!(
        adapter_bytes(&straight.join("checkpoints/step-000012")),
        adapter_bytes(&resumed.join("checkpoints/step-000012")),
        "steps 7–12 repeat exactly after --resume"
    );
}

#[test]
fn bad_recipes_are_refused_before_any_work() {
    let dir = workdir("refuse");
    let out = dir.join("out");
    for (bad, what) in [
        ("learning_rate = 1e-3", "learning_rate = -1.0"),
        ("targets = [\"q\", \"v\"]", "targets = [\"q\", \"wq\"]"),
        ("base_mode = \"f32\"", "base_mode = \"int3\""),
        ("batch_size = 3", "batch_size = 0"),
        ("rank = 4", "rank = 4\nranks = 5"),
    ] {
        let r = recipe(&dir, &out, "");
        let text = std::fs::read_to_string(&r).unwrap().replace(bad, what);
        std::fs::write(&r, text).unwrap();
        let run = trainer(&["train", "--config", r.to_str().unwrap()]);
        assert_eq!(run.status.code(), Some(1), "{what} accepted");
        let err = String::from_utf8_lossy(&run.stderr);
        assert!(
            err.contains("recipe")
                || err.contains("learning_rate")
                || err.contains("target")
                || err.contains("base_mode")
                || err.contains("batch_size"),
            "{what}: {err}"
        );
        assert!(!out.join("checkpoints").exists(), "{what}: nothing is written");
    }
    // --resume with nothing to resume from.
    let r = recipe(&dir, &out, "");
    let run = trainer(&["train", "--config", r.to_str().unwrap(), "--resume"]);
    assert_eq!(run.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&run.stderr).contains("no checkpoint"));
}

/// The default model is one file: the extension's `copilot.model` default, scripts/lib.sh's DEFAULT_MODEL (which
/// scripts/demo serves) and the file of scripts/models.tsv's `default` row (what `scripts/fetch-model` writes),
/// and that row folds a committed PEFT adapter into the base row.
#[test]
fn the_default_model_is_the_same_file_everywhere() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let read = |p: &str| std::fs::read_to_string(root.join(p)).unwrap();
    let table = read("scripts/models.tsv");
    let row = |name: &str| -> Vec<String> {
        let line = table.lines().find(|l| l.starts_with(&format!("{name}\t"))).unwrap_or_else(|| panic!("no {name}"));
        line.split('\t').map(str::to_string).collect()
    };
    let mut default = row("default");
    while let Some(target) = default[1].strip_prefix('=') {
        default = row(target);
    }
    let file = &default[1];
    assert!(file.ends_with(".gguf"), "{default:?}");
    let gucs = read("extension/src/gucs.rs");
    // `pub const DEFAULT_MODEL_PATH: &CStr = c"…";`, however rustfmt breaks it.
    let guc = gucs
        .split_once("pub const DEFAULT_MODEL_PATH")
        .and_then(|(_, rest)| rest.split_once("c\""))
        .and_then(|(_, rest)| rest.split_once('"'))
        .map(|(path, _)| path)
        .expect("gucs.rs defines DEFAULT_MODEL_PATH");
    assert!(gucs.contains("GucSetting::<Option<CString>>::new(Some(DEFAULT_MODEL_PATH))"), "copilot.model uses it");
    assert_eq!(guc, format!("/var/lib/copilot/models/{file}"), "copilot.model's default");
    let lib = read("scripts/lib.sh");
    assert!(lib.contains(&format!("\nDEFAULT_MODEL=$COPILOT_MODEL_DIR/{file}\n")), "scripts/lib.sh's DEFAULT_MODEL");
    let source = &default[4];
    if let Some(spec) = source.strip_prefix("merge:") {
        let (base, adapter) = spec.split_once('+').expect("merge:<row>+<adapter>");
        assert!(row(base)[4].starts_with("hf:"), "the base comes from the Hub or PyPI");
        let dir = root.join(adapter);
        let cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("adapter_config.json")).unwrap()).unwrap();
        assert_eq!(cfg["peft_type"], "LORA");
        assert_eq!(cfg["base_model_name_or_path"], "Qwen/Qwen2.5-Coder-1.5B-Instruct");
        assert!(dir.join("adapter_model.safetensors").is_file());
        let card = std::fs::read_to_string(dir.join("README.md")).expect("the adapter has a model card");
        assert!(card.starts_with("---\n") && card.contains("license:"), "card front matter");
        assert!(default[2].len() == 64 && default[2].bytes().all(|b| b.is_ascii_hexdigit()), "a sha256");
    }
}

/// `--init-adapter DIR --start-step N` continues a run whose checkpoints are gone from an adapter alone: it is
/// validated first (the same loss as the run it came from at step N), then steps N+1.. see the recipe's rows, masks
/// and learning rates (step N+1's loss equals the straight run's, which is computed before any update), with fresh
/// optimizer moments. Mixing it with --resume, a step past the schedule, an output that holds checkpoints and an
/// adapter of another rank are refused before any step.
#[test]
fn init_adapter_continues_the_recipe_from_a_saved_adapter() {
    let dir = workdir("warm");
    let straight = dir.join("straight");
    let r = recipe(&dir, &straight, "");
    let run = trainer(&["train", "--config", r.to_str().unwrap()]);
    assert!(run.status.success(), "train failed: {}", String::from_utf8_lossy(&run.stderr));
    let lines = |out: &Path| -> Vec<serde_json::Value> {
        std::fs::read_to_string(out.join("train_log.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let at = |log: &[serde_json::Value], step: u64, key: &str| -> f64 {
        let hit = log.iter().find(|l| l["step"] == step && l.get(key).is_some());
        hit.unwrap_or_else(|| panic!("no {key} at step {step}"))[key].as_f64().unwrap()
    };
    let from = straight.join("checkpoints/step-000004");
    let warm = dir.join("warm");
    let w = recipe(&dir, &warm, "");
    let args = |extra: &[&str]| -> Vec<String> {
        ["train", "--config", w.to_str().unwrap()].iter().chain(extra).map(|s| s.to_string()).collect()
    };
    let from_s = from.to_str().unwrap();
    let run = trainer(&["train", "--config", w.to_str().unwrap(), "--init-adapter", from_s, "--start-step", "4"]);
    assert!(run.status.success(), "warm start failed: {}", String::from_utf8_lossy(&run.stderr));
    let (a, b) = (lines(&straight), lines(&warm));
    assert_eq!(b[0]["step"], 4);
    assert_eq!(at(&b, 4, "val_loss"), at(&a, 4, "val_loss"), "the adapter is the straight run's at step 4");
    assert_eq!(b.iter().filter(|l| l.get("loss").is_some()).count(), 4, "steps 5–8 ran");
    assert_eq!(at(&b, 5, "lr"), at(&a, 5, "lr"), "the recipe's schedule");
    assert_eq!(at(&b, 5, "loss"), at(&a, 5, "loss"), "the recipe's rows and dropout masks at step 5");
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(warm.join("training_summary.json")).unwrap()).unwrap();
    assert_eq!(summary["steps"], 8);
    assert_eq!(summary["warm_start"]["step"], 4);
    assert_eq!(summary["warm_start"]["adapter_sha256"].as_str().map(str::len), Some(64));
    assert!(warm.join("checkpoints/step-000008/state.json").is_file());
    // The warm start is kept in the checkpoints' state, so a later --resume still reports where the run began.
    let state = std::fs::read_to_string(warm.join("checkpoints/step-000008/state.json")).unwrap();
    assert!(state.contains("\"warm_start\""), "{state}");

    // Refusals, before any step.
    let refused = |extra: &[&str], out: &Path, want: &str| {
        let before = out.join("train_log.jsonl").metadata().map(|m| m.len()).ok();
        let a = args(extra);
        let run = trainer(&a.iter().map(String::as_str).collect::<Vec<_>>());
        assert!(!run.status.success(), "{extra:?} accepted");
        let err = String::from_utf8_lossy(&run.stderr);
        assert!(err.contains(want), "{extra:?}: {err}");
        assert_eq!(out.join("train_log.jsonl").metadata().map(|m| m.len()).ok(), before, "{extra:?} wrote a step");
    };
    refused(&["--init-adapter", from_s, "--start-step", "4", "--resume"], &warm, "cannot be used with");
    refused(&["--init-adapter", from_s], &warm, "--start-step");
    refused(&["--init-adapter", from_s, "--start-step", "4"], &warm, "already holds checkpoints");
    std::fs::remove_dir_all(&warm).unwrap();
    refused(&["--init-adapter", from_s, "--start-step", "8"], &warm, "the recipe has 8 steps");
    let other = recipe(&dir, &warm, "").to_str().unwrap().to_string();
    std::fs::write(&other, std::fs::read_to_string(&other).unwrap().replace("rank = 4", "rank = 2")).unwrap();
    let run = trainer(&["train", "--config", &other, "--init-adapter", from_s, "--start-step", "4"]);
    assert!(!run.status.success(), "an adapter of another rank accepted");
    assert!(String::from_utf8_lossy(&run.stderr).contains("rank"), "{}", String::from_utf8_lossy(&run.stderr));
    assert!(!warm.join("checkpoints").exists());
}
