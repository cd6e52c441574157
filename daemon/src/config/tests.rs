use super::*;

fn args(v: &[&str]) -> Args {
    Args::try_parse_from(std::iter::once("kilnd").chain(v.iter().copied())).unwrap()
}

#[test]
fn flags_win_over_the_file_which_wins_over_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::fs::write(
        root.join("kiln.toml"),
        "[cache]\ndir = \"c\"\n[registry]\nlisten = [\"127.0.0.1:6000\"]\nallow-hosts = [\"box\"]\n",
    )
    .unwrap();
    let r = root.to_str().unwrap();
    let c = Config::load(args(&[r])).unwrap();
    assert_eq!(c.cache, root.join("c"));
    assert_eq!(c.listen, ["127.0.0.1:6000".parse().unwrap()]);
    assert!(!c.skip_unavailable);
    assert_eq!(c.allow_hosts, ["box"]);

    let c = Config::load(args(&[r, "--listen", "127.0.0.1:0", "--cache", "/x/y"])).unwrap();
    assert_eq!(c.cache, PathBuf::from("/x/y"));
    assert_eq!(c.listen, ["127.0.0.1:0".parse().unwrap()]);
}

#[test]
fn defaults_listen_on_loopback_only() {
    let dir = tempfile::tempdir().unwrap();
    let c = Config::load(args(&[dir.path().to_str().unwrap(), "--cache", "/c"])).unwrap();
    assert!(c.skip_unavailable);
    assert!(
        c.listen
            .iter()
            .all(|a| a.ip().is_loopback() && a.port() == 5000)
    );
}

#[test]
fn every_argument_says_what_it_is() {
    use clap::CommandFactory;
    let cmd = Args::command();
    let missing: Vec<String> = cmd
        .get_arguments()
        .filter(|a| a.get_help().is_none())
        .map(|a| a.get_id().to_string())
        .collect();
    assert!(
        missing.is_empty(),
        "kilnd arguments without a description: {missing:?}"
    );
}

#[test]
fn listen_names_resolve() {
    let dir = tempfile::tempdir().unwrap();
    let r = dir.path().to_str().unwrap();
    let c = Config::load(args(&[r, "--cache", "/c", "--listen", "localhost:5001"])).unwrap();
    assert!(!c.listen.is_empty());
    assert!(
        c.listen
            .iter()
            .all(|a| a.ip().is_loopback() && a.port() == 5001),
        "{:?}",
        c.listen
    );
    let c = Config::load(args(&[
        r,
        "--cache",
        "/c",
        "--listen",
        "[::1]:7,127.0.0.1:7",
    ]))
    .unwrap();
    assert_eq!(c.listen.len(), 2);
    assert!(!c.skip_unavailable);
    for bad in ["localhost", "localhost:http", "no-such-host.invalid:5000"] {
        let err = Config::load(args(&[r, "--cache", "/c", "--listen", bad])).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("--listen") && msg.contains(bad), "{msg}");
    }
    std::fs::write(
        dir.path().join("kiln.toml"),
        "[registry]\nlisten = [\"localhost:6000\"]\n",
    )
    .unwrap();
    let c = Config::load(args(&[r, "--cache", "/c"])).unwrap();
    assert!(
        c.listen
            .iter()
            .all(|a| a.ip().is_loopback() && a.port() == 6000)
    );
}

#[test]
fn builders_per_package_unless_the_flag_decides() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("kiln.toml"),
        "[build]\nbuilder = \"native\"\n[packages.\"kiln/app\"]\nbuilder = \"docker\"\n",
    )
    .unwrap();
    let r = dir.path().to_str().unwrap();
    let c = Config::load(args(&[r, "--cache", "/c"])).unwrap();
    assert_eq!(c.builders.mode_for("kiln/app"), BuilderMode::Docker);
    assert_eq!(c.builders.mode_for("kiln/other"), BuilderMode::Native);
    let c = Config::load(args(&[r, "--cache", "/c", "--builder", "auto"])).unwrap();
    assert_eq!(c.builders.mode_for("kiln/app"), BuilderMode::Auto);
    let err = Config::load(args(&[r, "--cache", "/c", "--builder", "podman"])).unwrap_err();
    assert!(err.to_string().contains("auto, native or docker"), "{err}");
}

#[test]
fn bad_files_say_where() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("kiln.toml"), "[cache]\nsize = 3\n").unwrap();
    let err = Config::load(args(&[dir.path().to_str().unwrap()])).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("kiln.toml") && msg.contains("size"), "{msg}");

    let err = Config::load(args(&["/definitely/not/here"])).unwrap_err();
    assert!(err.to_string().contains("not a directory"), "{err}");
}

#[test]
fn upstreams_from_the_file_flags_and_push() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("kiln.toml"),
        "[[upstream]]\nregistry = \"reg.example:5000\"\nprefix = \"team\"\nca-file = \"ca.pem\"\npush = true\n\
         [[upstream]]\nregistry = \"127.0.0.1:5001\"\n\
         [[upstream]]\nregistry = \"mirror.example\"\nmirror = true\n",
    )
    .unwrap();
    let r = dir.path().to_str().unwrap();
    let c = Config::load(args(&[r, "--cache", "/c"])).unwrap();
    let names: Vec<String> = c.upstreams.iter().map(|u| u.to_string()).collect();
    assert_eq!(
        names,
        ["mirror.example", "reg.example:5000/team", "127.0.0.1:5001"]
    );
    assert!(c.upstreams[0].mirror && !c.upstreams[0].push);
    assert!(c.upstreams[1].push && !c.upstreams[1].insecure);
    assert_eq!(c.upstreams[1].ca_file, Some(dir.path().join("ca.pem")));
    assert!(c.upstreams[2].insecure && !c.upstreams[2].push);

    let c = Config::load(args(&[
        r,
        "--cache",
        "/c",
        "--upstream",
        "localhost:6000/x",
        "--push",
    ]))
    .unwrap();
    let names: Vec<String> = c.upstreams.iter().map(|u| u.to_string()).collect();
    assert_eq!(names, ["mirror.example", "localhost:6000/x"]);
    assert!(c.upstreams[1].push && c.upstreams[1].insecure);

    let err = Config::load(args(&[r, "--cache", "/c", "--upstream", "a b"])).unwrap_err();
    assert!(err.to_string().contains("REGISTRY[/PREFIX]"), "{err}");
    std::fs::write(
        dir.path().join("kiln.toml"),
        "[[upstream]]\nregistry = \"r\"\npassword = \"x\"\n",
    )
    .unwrap();
    let err = Config::load(args(&[r, "--cache", "/c"])).unwrap_err();
    assert!(err.to_string().contains("password"), "{err}");
}
