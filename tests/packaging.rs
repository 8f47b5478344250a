//! Deployment files: the systemd units in `systemd/`, the `Dockerfile` and
//! `.dockerignore` (CONTRACT §9, §10). Std only. The static checks always run;
//! `systemd-analyze verify` and `security` need `systemd-analyze` and fail without it.
//! The Dockerfile's HEALTHCHECK and its container config are run for real (bash and
//! the built binary), without Docker.

use std::collections::BTreeSet;
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_keygate");
const INSTALLED_BIN: &str = "/usr/local/bin/keygate";

/// Each unit, the example config it runs (same file name under `config/`) and its mode.
const UNITS: [(&str, &str, &str); 3] = [
    ("keygate.service", "keygate.yaml", "standalone"),
    ("keygate-gateway.service", "gateway.yaml", "gateway"),
    ("keygate-control-plane.service", "control-plane.yaml", "control-plane"),
];

/// Placeholder values for every `${env:...}` the example configs name.
const ENV: [(&str, &str); 4] = [
    ("KEYGATE_ADMIN_TOKEN", "kgadm_packaging_test"),
    ("KEYGATE_SYNC_TOKEN", "kgsync_packaging_test"),
    ("KEYGATE_DATABASE_URL", "postgres://keygate@db.example:5432/keygate"),
    ("KEYGATE_CONTROL_PLANE_URL", "http://cp.example:9090"),
];

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    let path = repo().join(rel);
    fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// A fresh, empty directory under the system temp dir (removed on drop).
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("keygate-packaging-{tag}-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn combined(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

fn on_path(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|dir| dir.join(program)).find(|p| p.is_file())
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0").local_addr().unwrap().port()
}

/// Waits for `child` to exit, killing it after `timeout`.
fn wait_with_timeout(child: &mut Child, timeout: Duration, what: &str) -> ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what}: still running after {timeout:?}");
        }
        thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------------------
// systemd units
// ---------------------------------------------------------------------------

/// A unit file: its sections in order, each with its `Key=value` lines in order.
struct Unit {
    name: String,
    sections: Vec<(String, Vec<(String, String)>)>,
}

impl Unit {
    fn parse(name: &str, text: &str) -> Unit {
        let mut sections: Vec<(String, Vec<(String, String)>)> = Vec::new();
        let mut logical = String::new();
        for (i, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if logical.is_empty() && (line.is_empty() || line.starts_with('#') || line.starts_with(';')) {
                continue;
            }
            // A trailing backslash continues the line.
            if let Some(head) = line.strip_suffix('\\') {
                logical.push_str(head);
                logical.push(' ');
                continue;
            }
            logical.push_str(line);
            let line = std::mem::take(&mut logical);
            if let Some(section) = line.strip_prefix('[') {
                let section = section.strip_suffix(']').unwrap_or_else(|| panic!("{name}:{}: bad section", i + 1));
                assert!(
                    sections.iter().all(|(s, _)| s != section),
                    "{name}:{}: section [{section}] appears twice",
                    i + 1
                );
                sections.push((section.to_owned(), Vec::new()));
                continue;
            }
            let (key, value) =
                line.split_once('=').unwrap_or_else(|| panic!("{name}:{}: not Key=value: {line:?}", i + 1));
            let (_, entries) =
                sections.last_mut().unwrap_or_else(|| panic!("{name}:{}: {key}= outside any section", i + 1));
            entries.push((key.trim().to_owned(), value.trim().to_owned()));
        }
        assert!(logical.is_empty(), "{name}: ends inside a continued line");
        Unit { name: name.to_owned(), sections }
    }

    fn section(&self, section: &str) -> &[(String, String)] {
        self.sections
            .iter()
            .find(|(s, _)| s == section)
            .map(|(_, entries)| entries.as_slice())
            .unwrap_or_else(|| panic!("{}: no [{section}] section", self.name))
    }

    /// Every value given to `key`, in file order.
    fn all(&self, section: &str, key: &str) -> Vec<&str> {
        self.section(section).iter().filter(|(k, _)| k == key).map(|(_, v)| v.as_str()).collect()
    }

    /// The value of a key that must be set exactly once.
    #[track_caller]
    fn one(&self, section: &str, key: &str) -> &str {
        match self.all(section, key).as_slice() {
            [v] => v,
            [] => panic!("{}: [{section}] lacks {key}=", self.name),
            many => panic!("{}: [{section}] sets {key}= {} times: {many:?}", self.name, many.len()),
        }
    }

    #[track_caller]
    fn expect(&self, section: &str, key: &str, want: &str) {
        assert_eq!(self.one(section, key), want, "{}: [{section}] {key}=", self.name);
    }

    /// The space-separated words of every value given to a list-valued key.
    fn words(&self, section: &str, key: &str) -> BTreeSet<&str> {
        self.all(section, key).into_iter().flat_map(str::split_whitespace).collect()
    }
}

fn load_unit(file: &str) -> Unit {
    Unit::parse(file, &read(&format!("systemd/{file}")))
}

/// Directives every unit sets to exactly these values.
const HARDENING: [(&str, &str); 18] = [
    ("ProtectSystem", "strict"),
    ("ProtectHome", "yes"),
    ("PrivateTmp", "yes"),
    ("PrivateDevices", "yes"),
    ("NoNewPrivileges", "yes"),
    ("ProtectKernelTunables", "yes"),
    ("ProtectKernelModules", "yes"),
    ("ProtectControlGroups", "yes"),
    ("RestrictNamespaces", "yes"),
    ("LockPersonality", "yes"),
    ("MemoryDenyWriteExecute", "yes"),
    ("SystemCallArchitectures", "native"),
    ("CapabilityBoundingSet", "CAP_NET_BIND_SERVICE"),
    ("AmbientCapabilities", "CAP_NET_BIND_SERVICE"),
    ("LimitNOFILE", "1048576"),
    ("KillSignal", "SIGTERM"),
    ("Restart", "on-failure"),
    ("RestartSec", "2"),
];

#[test]
fn units_run_their_config_with_the_required_directives() {
    let mut runtime_dirs = BTreeSet::new();
    for (file, config, _) in UNITS {
        let unit = load_unit(file);
        let names: Vec<&str> = unit.sections.iter().map(|(s, _)| s.as_str()).collect();
        assert_eq!(names, ["Unit", "Service", "Install"], "{file}: sections");

        // [Unit]: ordering after the network; a database is ordered, never required.
        assert!(!unit.one("Unit", "Description").is_empty());
        assert!(unit.words("Unit", "After").contains("network-online.target"), "{file}: After=");
        assert!(unit.words("Unit", "Wants").contains("network-online.target"), "{file}: Wants=");
        for key in ["Requires", "Requisite", "BindsTo"] {
            assert!(
                !unit.words("Unit", key).iter().any(|u| u.starts_with("postgresql")),
                "{file}: {key}= on PostgreSQL; use After= only"
            );
        }

        // [Service]: the command, reload, stop and restart behaviour.
        let conf_path = format!("/etc/keygate/{config}");
        assert_eq!(unit.one("Service", "ExecStart"), format!("{INSTALLED_BIN} serve -c {conf_path}"), "{file}");
        let reload = unit.all("Service", "ExecReload");
        let (hup, checks) = reload.split_last().unwrap_or_else(|| panic!("{file}: no ExecReload="));
        assert_eq!(*hup, "/bin/kill -HUP $MAINPID", "{file}: the last ExecReload= must send SIGHUP");
        for check in checks {
            assert_eq!(*check, format!("{INSTALLED_BIN} check-config -c {conf_path}"), "{file}: ExecReload=");
        }
        for (key, want) in HARDENING {
            unit.expect("Service", key, want);
        }
        // keygate drains for up to 30 s and flushes usage for up to 5 s after SIGTERM.
        let stop: u64 = unit.one("Service", "TimeoutStopSec").parse().expect("TimeoutStopSec in seconds");
        assert_eq!(stop, 45, "{file}: TimeoutStopSec=");
        assert_eq!(
            unit.words("Service", "RestrictAddressFamilies"),
            BTreeSet::from(["AF_INET", "AF_INET6", "AF_UNIX"]),
            "{file}: RestrictAddressFamilies="
        );
        // keygate sends READY=1 once it serves (src/systemd_notify.rs).
        unit.expect("Service", "Type", "notify");
        for key in ["Type", "KillMode"] {
            if let Some(v) = unit.all("Service", key).last() {
                assert!(
                    !["forking", "oneshot", "none"].contains(v),
                    "{file}: {key}={v}: keygate runs in the foreground"
                );
            }
        }

        // One approach for the identity, the same in every unit: a fixed system user.
        unit.expect("Service", "User", "keygate");
        unit.expect("Service", "Group", "keygate");
        assert!(unit.all("Service", "DynamicUser").is_empty(), "{file}: mixes DynamicUser= with User=");
        unit.expect("Service", "StateDirectory", "keygate");
        unit.expect("Service", "WorkingDirectory", "/var/lib/keygate");
        assert!(
            unit.all("Service", "EnvironmentFile").contains(&"-/etc/keygate/keygate.env"),
            "{file}: EnvironmentFile=-/etc/keygate/keygate.env"
        );
        for path in unit.words("Service", "ReadWritePaths") {
            let path = path.trim_start_matches('-');
            assert!(
                path.starts_with("/var/lib/keygate") || path.starts_with("/run/keygate"),
                "{file}: ReadWritePaths={path}: only the data and runtime directories are writable"
            );
        }

        // The upgrade socket lives in $TMPDIR, which must be this unit's runtime directory.
        let runtime = unit.one("Service", "RuntimeDirectory");
        assert!(runtime == "keygate" || runtime.starts_with("keygate-"), "{file}: RuntimeDirectory={runtime}");
        assert!(
            unit.words("Service", "Environment").contains(format!("TMPDIR=/run/{runtime}").as_str()),
            "{file}: Environment=TMPDIR=/run/{runtime}"
        );
        assert!(
            runtime_dirs.insert(runtime.to_owned()),
            "{file}: RuntimeDirectory={runtime} is shared with another unit; systemd removes it when either stops"
        );

        unit.expect("Install", "WantedBy", "multi-user.target");
    }
    assert!(load_unit("keygate-control-plane.service").words("Unit", "After").contains("postgresql.service"));
}

#[test]
fn units_name_the_example_configs_and_their_modes() {
    for (file, config, mode) in UNITS {
        let unit = load_unit(file);
        let exec = unit.one("Service", "ExecStart");
        let named = exec.rsplit_once("/etc/keygate/").map(|(_, f)| f).expect("config under /etc/keygate");
        assert_eq!(named, config, "{file}");
        let text = fs::read_to_string(repo().join("config").join(named))
            .unwrap_or_else(|e| panic!("{file} runs /etc/keygate/{named}, but config/{named}: {e}"));
        let config_mode = text
            .lines()
            .find_map(|l| l.strip_prefix("mode:"))
            .map(|m| m.split('#').next().unwrap().trim())
            .unwrap_or("standalone");
        assert_eq!(config_mode, mode, "config/{named} is not a {mode} config");

        // Paths the node writes must lie in what the unit leaves writable: relative to
        // WorkingDirectory=/var/lib/keygate, or absolute under it.
        for line in text.lines() {
            let line = line.split(" #").next().unwrap();
            let written = line
                .split_once("cache_file:")
                .map(|(_, p)| p)
                .or_else(|| line.split_once("url: sqlite://").map(|(_, p)| p))
                .or_else(|| line.contains("type: file").then(|| line.split_once("path:").map(|(_, p)| p)).flatten());
            if let Some(path) = written {
                let path = path.trim().trim_end_matches('}').trim().trim_matches('"');
                assert!(
                    !path.starts_with('/') || path.starts_with("/var/lib/keygate/"),
                    "config/{named} writes {path}, outside the unit's writable /var/lib/keygate"
                );
            }
        }

        // Every ${env:...} it names is documented in the environment file's example.
        let env_example = read("systemd/keygate.env.example");
        for var in text.split("${env:").skip(1).map(|rest| &rest[..rest.find('}').expect("closing }")]) {
            assert!(
                env_example.contains(&format!("{var}=")),
                "config/{named} needs {var}: add it to keygate.env.example"
            );
        }

        // And the binary accepts it, given those variables.
        let dir = TempDir::new("check");
        let out = Command::new(BIN)
            .args(["check-config", "-c"])
            .arg(repo().join("config").join(named))
            .current_dir(&dir.0)
            .envs(ENV)
            .output()
            .expect("run keygate check-config");
        assert!(out.status.success(), "check-config config/{named}:\n{}", combined(&out));
    }
}

#[test]
fn sysusers_creates_the_unit_user() {
    let text = read("systemd/keygate.sysusers");
    let line = text.lines().find(|l| l.starts_with("u ")).expect("a `u` line");
    let fields: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(fields[..3], ["u", "keygate", "-"], "{line}");
    assert!(line.contains("/var/lib/keygate"), "home directory: {line}");
}

/// The units with every `/usr/local/bin/keygate` pointed at the test binary, so that
/// `systemd-analyze` does not report the missing binary.
fn units_for_analysis(dir: &Path) -> Vec<PathBuf> {
    UNITS
        .iter()
        .map(|(file, _, _)| {
            let path = dir.join(file);
            fs::write(&path, read(&format!("systemd/{file}")).replace(INSTALLED_BIN, BIN)).unwrap();
            path
        })
        .collect()
}

/// Diagnostics about the unit file's own lines (`FILE:LINE: ...`): unknown keys, bad values.
fn file_diagnostics(out: &Output, path: &Path) -> Vec<String> {
    let prefix = format!("{}:", path.display());
    combined(out)
        .lines()
        .filter(|l| {
            l.strip_prefix(&prefix).is_some_and(|r| r.split(':').next().is_some_and(|n| n.parse::<u32>().is_ok()))
        })
        .map(str::to_owned)
        .collect()
}

fn systemd_analyze(args: &[&str], unit: &Path) -> Output {
    Command::new("systemd-analyze").args(args).arg(unit).output().expect("run systemd-analyze")
}

/// Fails the test unless `systemd-analyze` (Debian's `systemd` package, on CI's
/// machines) can run: a missing tool must not let these checks pass unrun.
#[track_caller]
fn require_systemd_analyze() {
    assert!(
        on_path("systemd-analyze").is_some(),
        "systemd-analyze is not installed: install systemd (Debian's `systemd` package) to run this test"
    );
}

#[test]
fn units_pass_systemd_analyze_verify() {
    require_systemd_analyze();
    let dir = TempDir::new("verify");
    for unit in units_for_analysis(&dir.0) {
        let out = systemd_analyze(&["verify", "--man=no"], &unit);
        assert!(out.status.success(), "systemd-analyze verify {}:\n{}", unit.display(), combined(&out));
        let diagnostics = file_diagnostics(&out, &unit);
        assert!(diagnostics.is_empty(), "systemd-analyze verify {}:\n{}", unit.display(), diagnostics.join("\n"));
    }

    // The check above is not vacuous: a typo and a bad value are reported.
    let broken = dir.0.join("keygate-broken.service");
    let text = fs::read_to_string(dir.0.join(UNITS[0].0)).unwrap();
    fs::write(
        &broken,
        text.replace("ProtectHome=yes", "ProtectHom=yes").replace("Restart=on-failure", "Restart=bogus"),
    )
    .unwrap();
    let out = systemd_analyze(&["verify", "--man=no"], &broken);
    let diagnostics = file_diagnostics(&out, &broken).join("\n");
    assert!(
        diagnostics.contains("ProtectHom") && diagnostics.contains("bogus"),
        "systemd-analyze verify missed errors in a broken unit:\n{}",
        combined(&out)
    );
}

#[test]
fn units_have_a_low_systemd_exposure_score() {
    require_systemd_analyze();
    let dir = TempDir::new("security");
    for unit in units_for_analysis(&dir.0) {
        let out = systemd_analyze(&["security", "--offline=yes", "--no-pager"], &unit);
        let text = combined(&out);
        // systemd before 250 has no --offline: that fails here too, rather than passing unchecked.
        let Some(score) = text.lines().find_map(|l| l.split_once("Overall exposure level for ")) else {
            panic!(
                "no exposure score from `systemd-analyze security --offline=yes` (needs systemd 250 or later):\n{text}"
            );
        };
        let score: f64 = score.1.split_whitespace().nth(1).and_then(|s| s.parse().ok()).expect(score.1);
        assert!(score <= 2.0, "{}: exposure {score} (want at most 2.0):\n{text}", unit.display());
    }
}

// ---------------------------------------------------------------------------
// Dockerfile
// ---------------------------------------------------------------------------

/// One Dockerfile instruction: its upper-case name and its arguments (continuations joined).
#[derive(Debug)]
struct Instr {
    name: String,
    args: String,
}

fn parse_dockerfile(text: &str) -> Vec<Instr> {
    let mut instrs = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        // Comment lines, also inside a continued instruction.
        if trimmed.starts_with('#') || (current.is_empty() && trimmed.is_empty()) {
            continue;
        }
        if let Some(head) = trimmed.strip_suffix('\\') {
            current.push_str(head);
            current.push(' ');
            continue;
        }
        current.push_str(trimmed);
        let full = std::mem::take(&mut current);
        let (name, args) = full.split_once(char::is_whitespace).unwrap_or((&full, ""));
        instrs.push(Instr { name: name.to_ascii_uppercase(), args: args.trim().to_owned() });
    }
    assert!(current.is_empty(), "Dockerfile ends inside a continued instruction");
    instrs
}

/// The instructions of each stage, split at `FROM`.
fn stages(instrs: &[Instr]) -> Vec<&[Instr]> {
    let starts: Vec<usize> = instrs.iter().enumerate().filter(|(_, i)| i.name == "FROM").map(|(n, _)| n).collect();
    assert_eq!(starts.first(), Some(&0), "the Dockerfile must start with FROM");
    starts.iter().enumerate().map(|(k, &s)| &instrs[s..starts.get(k + 1).copied().unwrap_or(instrs.len())]).collect()
}

fn dockerfile() -> Vec<Instr> {
    parse_dockerfile(&read("Dockerfile"))
}

/// Parses a JSON array of strings (the exec form of CMD, ENTRYPOINT, HEALTHCHECK).
fn json_strings(s: &str) -> Vec<String> {
    let s = s.trim();
    let inner =
        s.strip_prefix('[').and_then(|s| s.strip_suffix(']')).unwrap_or_else(|| panic!("not a JSON array: {s}"));
    let mut out = Vec::new();
    let mut chars = inner.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace() || *c == ',').is_some() {}
        match chars.next() {
            None => return out,
            Some('"') => {}
            Some(c) => panic!("unexpected {c:?} in {s}"),
        }
        let mut item = String::new();
        loop {
            match chars.next().unwrap_or_else(|| panic!("unterminated string in {s}")) {
                '"' => break,
                '\\' => match chars.next().unwrap_or_else(|| panic!("bad escape in {s}")) {
                    'n' => item.push('\n'),
                    'r' => item.push('\r'),
                    't' => item.push('\t'),
                    'u' => {
                        let hex: String = chars.by_ref().take(4).collect();
                        item.push(char::from_u32(u32::from_str_radix(&hex, 16).expect("\\u escape")).unwrap());
                    }
                    c @ ('"' | '\\' | '/') => item.push(c),
                    c => panic!("bad escape \\{c} in {s}"),
                },
                c => item.push(c),
            }
        }
        out.push(item);
    }
}

/// The words of the `&&`-separated shell command in `run` that starts with `first_words`.
fn shell_command<'a>(run: &'a str, first_words: &[&str]) -> Option<Vec<&'a str>> {
    run.split("&&")
        .map(|cmd| cmd.split_whitespace().filter(|w| !w.starts_with("--mount=")).collect::<Vec<_>>())
        .find(|words| words.len() >= first_words.len() && words[..first_words.len()] == *first_words)
}

/// The `-e 's/PATTERN/REPLACEMENT/'` expressions of the RUN that renders the container config.
fn container_config_sed(runtime_or_builder: &[&[Instr]]) -> Vec<(String, String)> {
    let run = runtime_or_builder
        .iter()
        .flat_map(|stage| stage.iter())
        .find(|i| i.name == "RUN" && i.args.contains("sed ") && i.args.contains("config/keygate.yaml"))
        .expect("a RUN that renders config/keygate.yaml with sed");
    let exprs: Vec<(String, String)> = run
        .args
        .split("-e '")
        .skip(1)
        .map(|rest| {
            let expr = &rest[..rest.find('\'').expect("closing quote")];
            let parts: Vec<&str> = expr.split('/').collect();
            assert!(parts.len() == 4 && parts[0] == "s" && parts[3].is_empty(), "unsupported sed expression {expr:?}");
            let pattern = parts[1].replace("\\.", ".");
            assert!(!pattern.contains(['\\', '*', '[', '^', '$']), "sed pattern {expr:?} is more than a literal");
            (pattern, parts[2].to_owned())
        })
        .collect();
    assert!(!exprs.is_empty(), "no -e 's/…/…/' expressions in {:?}", run.args);
    exprs
}

/// What `sed` makes of `config/keygate.yaml`: each expression replaces its first match per line.
fn container_config() -> String {
    let instrs = dockerfile();
    let exprs = container_config_sed(&stages(&instrs));
    let mut out = String::new();
    for line in read("config/keygate.yaml").lines() {
        let mut line = line.to_owned();
        for (pattern, replacement) in &exprs {
            line = line.replacen(pattern, replacement, 1);
        }
        out.push_str(&line);
        out.push('\n');
    }
    out
}

#[test]
fn dockerfile_is_multi_stage_and_runs_slim_as_non_root() {
    let instrs = dockerfile();
    let stages = stages(&instrs);
    assert!(stages.len() >= 2, "want a multi-stage build, got {} FROM", stages.len());
    let (builder, runtime) = (stages[0], *stages.last().unwrap());

    // Builder: the Rust image, cmake, the sources, the quickstart's release build.
    let from = &builder[0].args;
    assert!(from.starts_with("rust:") && from.contains("bookworm"), "builder FROM {from}");
    let builder_name = from.split_whitespace().collect::<Vec<_>>();
    let builder_name = match builder_name.as_slice() {
        [_, as_, name] if as_.eq_ignore_ascii_case("as") => *name,
        _ => panic!("the builder stage needs a name: FROM {from}"),
    };
    let runs: Vec<&str> = builder.iter().filter(|i| i.name == "RUN").map(|i| i.args.as_str()).collect();
    assert!(
        runs.iter().any(|r| shell_command(r, &["apt-get", "install"]).is_some_and(|w| w.contains(&"cmake"))),
        "the builder installs cmake"
    );
    assert!(
        builder.iter().any(|i| i.name == "COPY" && (i.args.starts_with(". ") || i.args.contains("Cargo.lock"))),
        "the builder copies the sources with Cargo.lock"
    );
    let build_run = runs.iter().find(|r| r.contains("cargo build")).expect("a RUN with cargo build");
    let build = shell_command(build_run, &["cargo", "build"]).unwrap();
    assert_eq!(build, ["cargo", "build", "--release", "--locked", "--bin", "keygate"]);

    // Same flags as the quickstart's build, less the example it also builds.
    let quickstart = read("scripts/quickstart.sh");
    let line = quickstart.lines().find(|l| l.trim_start().starts_with("cargo build")).expect("quickstart builds");
    let mut words = line.split_whitespace().peekable();
    let mut quick = Vec::new();
    while let Some(w) = words.next() {
        if w == "--example" {
            words.next();
        } else {
            quick.push(w);
        }
    }
    assert_eq!(build, quick, "the Dockerfile's build differs from scripts/quickstart.sh's");

    // The test suite builds the image's binary the same way and runs it as the container does.
    let suite = read("scripts/test.sh");
    assert!(
        suite.lines().any(|l| l.split_whitespace().collect::<Vec<_>>() == build),
        "scripts/test.sh does not run the Dockerfile's build ({})",
        build.join(" ")
    );

    // A target/ cache mount is not in the image: the binary must be copied out of it.
    let cache_targets: Vec<&str> = build_run
        .split_whitespace()
        .filter_map(|w| w.strip_prefix("--mount=type=cache,"))
        .filter_map(|opts| opts.split(',').find_map(|o| o.strip_prefix("target=")))
        .collect();

    // Runtime: slim Debian with ca-certificates only, the binary, the config, the data dir.
    let from = &runtime[0].args;
    assert!(from.starts_with("debian:") && from.ends_with("-slim"), "runtime FROM {from}");
    let installs: Vec<Vec<&str>> = runtime
        .iter()
        .filter(|i| i.name == "RUN")
        .filter_map(|i| shell_command(&i.args, &["apt-get", "install"]))
        .map(|w| w[2..].iter().copied().filter(|p| !p.starts_with('-')).collect())
        .collect();
    assert_eq!(installs, [["ca-certificates"]], "runtime packages");
    let runtime_text = runtime.iter().map(|i| format!("{} {}\n", i.name, i.args)).collect::<String>();
    for tool in ["curl", "wget"] {
        assert!(!runtime_text.contains(tool), "the runtime stage mentions {tool}");
    }
    let copy_bin = runtime
        .iter()
        .find(|i| i.name == "COPY" && i.args.ends_with(" /usr/local/bin/keygate"))
        .expect("COPY ... /usr/local/bin/keygate");
    assert!(copy_bin.args.starts_with(&format!("--from={builder_name} ")), "{copy_bin:?}");
    let source = copy_bin.args.split_whitespace().nth(1).unwrap();
    assert!(
        cache_targets.iter().all(|t| !source.starts_with(t)),
        "{source} is inside a cache mount ({cache_targets:?}), which is not part of the builder's image"
    );
    assert!(
        runtime.iter().any(|i| i.name == "COPY" && i.args.ends_with(" /etc/keygate/keygate.yaml")),
        "the default config is copied to /etc/keygate/keygate.yaml"
    );

    let last = |name: &str| runtime.iter().rev().find(|i| i.name == name).map(|i| i.args.as_str());
    let user = last("USER").expect("USER in the runtime stage");
    let uid = user.split(':').next().unwrap();
    assert!(!["root", "0", ""].contains(&uid), "USER {user} is root");
    if uid.parse::<u32>().is_ok() {
        assert!(runtime_text.contains(&format!("--uid {uid}")), "no user is created with uid {uid}");
    } else {
        assert!(runtime_text.contains("useradd"), "no user {uid} is created");
    }
    let volume = last("VOLUME").expect("VOLUME");
    assert!(volume.contains("/var/lib/keygate"), "VOLUME {volume}");
    assert_eq!(last("WORKDIR"), Some("/var/lib/keygate"), "the config's relative data/ paths need a writable cwd");
    let exposed: BTreeSet<&str> =
        runtime.iter().filter(|i| i.name == "EXPOSE").flat_map(|i| i.args.split_whitespace()).collect();
    assert!(exposed.contains("8080") && exposed.contains("9090"), "EXPOSE {exposed:?}");
    assert_eq!(last("STOPSIGNAL"), Some("SIGTERM"));
    assert_eq!(json_strings(last("ENTRYPOINT").expect("ENTRYPOINT")), ["/usr/local/bin/keygate"]);
    assert_eq!(json_strings(last("CMD").expect("CMD")), ["serve", "-c", "/etc/keygate/keygate.yaml"]);
    let healthcheck = last("HEALTHCHECK").expect("HEALTHCHECK");
    assert!(healthcheck.contains("/healthz") && healthcheck.contains("9090"), "HEALTHCHECK {healthcheck}");
}

#[test]
fn dockerignore_keeps_build_outputs_out_and_sources_in() {
    let text = read(".dockerignore");
    let patterns: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| l.trim_start_matches('/').trim_end_matches('/'))
        .collect();
    for excluded in ["target", "data", ".git"] {
        assert!(patterns.contains(&excluded), ".dockerignore lacks {excluded}");
    }
    for needed in
        ["Cargo.toml", "Cargo.lock", "build.rs", "src", "migrations", "config", "benches", "examples", "tests"]
    {
        assert!(!patterns.contains(&needed), ".dockerignore excludes {needed}, which the build needs");
    }
    assert!(patterns.iter().all(|p| !p.starts_with('!') && *p != "*" && *p != "**"), "{patterns:?}");
}

#[test]
fn container_config_listens_on_all_interfaces_and_is_valid() {
    let config = container_config();
    for want in ["address: 0.0.0.0:8080", "address: 0.0.0.0:9090", "127.0.0.1:9000"] {
        assert!(config.contains(want), "container config lacks {want}:\n{config}");
    }
    for gone in ["127.0.0.1:8080", "127.0.0.1:9090"] {
        assert!(!config.contains(gone), "container config still has {gone}:\n{config}");
    }
    let dir = TempDir::new("container-check");
    let path = dir.0.join("keygate.yaml");
    fs::write(&path, &config).unwrap();
    let out = Command::new(BIN)
        .args(["check-config", "-c"])
        .arg(&path)
        .current_dir(&dir.0)
        .envs(ENV)
        .output()
        .expect("run keygate check-config");
    assert!(out.status.success(), "check-config on the container config:\n{}", combined(&out));
}

// ---------------------------------------------------------------------------
// The HEALTHCHECK, run with bash
// ---------------------------------------------------------------------------

/// The HEALTHCHECK's command, pointed at `port` instead of 9090.
fn healthcheck_argv(port: u16) -> Vec<String> {
    let instrs = dockerfile();
    let hc = instrs.iter().rev().find(|i| i.name == "HEALTHCHECK").expect("HEALTHCHECK");
    let cmd = hc.args.split_once("CMD ").map(|(_, c)| c.trim()).expect("HEALTHCHECK ... CMD ...");
    let argv = if cmd.starts_with('[') {
        json_strings(cmd)
    } else {
        vec!["/bin/sh".to_owned(), "-c".to_owned(), cmd.to_owned()]
    };
    // /dev/tcp is a bash feature: the command must run bash itself.
    assert!(["bash", "/bin/bash", "/usr/bin/bash"].contains(&argv[0].as_str()), "HEALTHCHECK runs {:?}", argv[0]);
    let argv: Vec<String> = argv.into_iter().map(|a| a.replace("9090", &port.to_string())).collect();
    assert!(argv.iter().any(|a| a.contains(&port.to_string())), "HEALTHCHECK names no port");
    argv
}

fn run_healthcheck(port: u16) -> ExitStatus {
    let argv = healthcheck_argv(port);
    let mut child = Command::new(&argv[0])
        .args(&argv[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("run the HEALTHCHECK with bash");
    wait_with_timeout(&mut child, Duration::from_secs(10), "HEALTHCHECK")
}

/// A one-connection HTTP server on a free port: it answers `status` to `/healthz`, 404 to
/// anything else, and reports the request line it got.
fn tiny_server(status: &'static str) -> (u16, mpsc::Receiver<String>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let Ok((stream, _)) = listener.accept() else { return };
        stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let mut request_line = String::new();
        let _ = reader.read_line(&mut request_line);
        loop {
            let mut header = String::new();
            match reader.read_line(&mut header) {
                Ok(n) if n > 0 && header.trim_end() != "" => continue,
                _ => break,
            }
        }
        let status = if request_line.split_whitespace().nth(1) == Some("/healthz") { status } else { "404 Not Found" };
        let body = r#"{"status":"ok"}"#;
        let response = format!(
            "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        let _ = (&stream).write_all(response.as_bytes());
        let _ = tx.send(request_line.trim_end().to_owned());
    });
    (port, rx)
}

#[test]
fn healthcheck_passes_on_a_200_from_healthz() {
    let (port, request) = tiny_server("200 OK");
    let status = run_healthcheck(port);
    let request_line = request.recv_timeout(Duration::from_secs(5)).expect("the HEALTHCHECK connected");
    assert!(request_line.starts_with("GET /healthz HTTP/1."), "request line {request_line:?}");
    assert!(status.success(), "HEALTHCHECK against a healthy /healthz: {status}");
}

#[test]
fn healthcheck_fails_on_an_error_status() {
    let (port, request) = tiny_server("503 Service Unavailable");
    let status = run_healthcheck(port);
    request.recv_timeout(Duration::from_secs(5)).expect("the HEALTHCHECK connected");
    assert!(!status.success(), "HEALTHCHECK passed on a 503");
}

#[test]
fn healthcheck_fails_when_nothing_listens() {
    let status = run_healthcheck(free_port());
    assert!(!status.success(), "HEALTHCHECK passed with nothing listening");
}

// ---------------------------------------------------------------------------
// The container's config and HEALTHCHECK against the real binary
// ---------------------------------------------------------------------------

fn signal(child: &Child, sig: &str) {
    let status = Command::new("kill").arg(format!("-{sig}")).arg(child.id().to_string()).status().expect("run kill");
    assert!(status.success(), "kill -{sig}");
}

/// What the container does, minus Docker: `serve -c` the rendered config from the data
/// directory as working directory; /healthz answers the HEALTHCHECK; SIGHUP (the units'
/// ExecReload) keeps it serving; SIGTERM (STOPSIGNAL, KillSignal) ends it with exit 0.
#[test]
fn container_node_is_healthy_reloads_on_hup_and_exits_0_on_term() {
    run_container_node(Path::new(BIN));
}

/// The same with the binary the image ships: `scripts/test.sh` builds it with the
/// Dockerfile's own command (`dockerfile_is_multi_stage_and_runs_slim_as_non_root` holds
/// them equal) and runs this with `KEYGATE_RELEASE_BIN` pointing at it.
#[test]
#[ignore = "needs the release build; scripts/test.sh builds it and runs this"]
fn the_image_build_runs_the_container_node() {
    let bin = std::env::var_os("KEYGATE_RELEASE_BIN")
        .map(PathBuf::from)
        .expect("KEYGATE_RELEASE_BIN: the binary `cargo build --release --locked --bin keygate` made");
    assert!(bin.is_file(), "{} is not a file", bin.display());
    run_container_node(&bin);
}

fn run_container_node(bin: &Path) {
    let dir = TempDir::new("container-run");
    let gateway = free_port();
    // The kernel may hand the port just released out again.
    let admin = std::iter::repeat_with(free_port).find(|&port| port != gateway).unwrap_or_default();
    let config = container_config()
        .replace("0.0.0.0:8080", &format!("127.0.0.1:{gateway}"))
        .replace("0.0.0.0:9090", &format!("127.0.0.1:{admin}"));
    let config_path = dir.0.join("keygate.yaml");
    fs::write(&config_path, config).unwrap();
    let data = dir.0.join("workdir");
    fs::create_dir(&data).unwrap();
    let log = dir.0.join("keygate.log");
    let log_file = fs::File::create(&log).unwrap();
    let mut child = Command::new(bin)
        .args(["serve", "-c"])
        .arg(&config_path)
        .current_dir(&data)
        .envs(ENV)
        .env("TMPDIR", &dir.0)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log_file)
        .spawn()
        .expect("start keygate serve");
    let logs = || fs::read_to_string(&log).unwrap_or_default();

    let addr: SocketAddr = format!("127.0.0.1:{admin}").parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("keygate exited ({status}) before serving its admin API:\n{}", logs());
        }
        assert!(Instant::now() < deadline, "admin API not up after 30 s:\n{}", logs());
        thread::sleep(Duration::from_millis(50));
    }
    let status = run_healthcheck(admin);
    assert!(status.success(), "HEALTHCHECK against keygate's /healthz: {status}\n{}", logs());
    assert!(data.join("data/keygate.db").exists(), "the store is not under the working directory:\n{}", logs());

    signal(&child, "HUP");
    thread::sleep(Duration::from_millis(500));
    assert!(child.try_wait().unwrap().is_none(), "SIGHUP ended keygate:\n{}", logs());
    assert!(run_healthcheck(admin).success(), "HEALTHCHECK after SIGHUP:\n{}", logs());

    signal(&child, "TERM");
    // Well inside the units' TimeoutStopSec=45 (nothing in flight to drain here).
    let status = wait_with_timeout(&mut child, Duration::from_secs(40), "keygate after SIGTERM");
    assert_eq!(status.code(), Some(0), "exit status after SIGTERM:\n{}", logs());
}
