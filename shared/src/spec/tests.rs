use super::*;

#[test]
fn tag_templates() {
    let t: TagTemplate = "v1-{{.Hash}}".parse().unwrap();
    assert_eq!(t.render("abc"), "v1-abc");
    let t: TagTemplate = "x {{- .Hash -}} y".parse().unwrap();
    assert_eq!(t.render("abc"), "xabcy");
    let t: TagTemplate = "{{ .Hash }}{{.Hash}}".parse().unwrap();
    assert_eq!(t.render("ab"), "abab");
    assert_eq!("".parse::<TagTemplate>().unwrap(), TagTemplate::default());
    assert_eq!("fixed".parse::<TagTemplate>().unwrap().render("h"), "fixed");
    for bad in ["{{.Other}}", "{{.Hash", "a b{{.Hash}}", "{{printf .Hash}}"] {
        assert!(bad.parse::<TagTemplate>().is_err(), "{bad}");
    }
}

#[test]
fn paths_and_sources() {
    assert!("a/../b".parse::<SubPath>().is_ok());
    for bad in ["", "/etc/x", "..", "a/../..", ".", "a/.."] {
        assert!(bad.parse::<SubPath>().is_err(), "{bad}");
    }
    let s: ExtraSource = "../../src:/go/src/./x/".parse().unwrap();
    assert_eq!((s.src.as_str(), s.dst.as_str()), ("../../src", "/go/src/x"));
    for bad in ["a", "a:b:c", ":b", "a:", "a:../x"] {
        assert!(bad.parse::<ExtraSource>().is_err(), "{bad}");
    }
}

#[test]
fn build_args() {
    let a: BuildArg = "A=b=c".parse().unwrap();
    assert_eq!((a.key.as_str(), a.value.as_str()), ("A", "b=c"));
    let a: BuildArg = "A=@lkt:pkg:../x".parse().unwrap();
    assert_eq!(a.lkt_pkg(), Some("../x"));
    assert!("A_%=@lkt:pkgs:../*".parse::<BuildArg>().is_ok());
    for bad in ["A", "=x", "A=@lkt:pkgs:x", "A=@lkt:what"] {
        assert!(bad.parse::<BuildArg>().is_err(), "{bad}");
    }
}

#[test]
fn json_round_trip() {
    let json = serde_json::json!({
        "image": "a", "org": "o", "tag": "x-{{.Hash}}", "dockerfile": "d/Dockerfile",
        "arches": ["s390x"], "extra-sources": ["../l:/l"], "gitrepo": "g",
        "network": true, "disable-cache": true, "config": {"net": "host"},
        "buildArgs": ["A=1"],
        "depends": {"docker-images": {"target": "t.tar", "from-file": "f"}}
    });
    let spec: BuildSpec = serde_json::from_value(json.clone()).unwrap();
    let back = serde_json::to_value(&spec).unwrap();
    let again: BuildSpec = serde_json::from_value(back).unwrap();
    assert_eq!(spec, again);
    assert_eq!(spec.tag.render("h"), "x-h");
    assert_eq!(spec.repo_name().unwrap().as_str(), "o/a");
}

#[test]
fn arches_and_images() {
    assert_eq!("arm64".parse::<Arch>().unwrap().platform(), "linux/arm64");
    assert!("x86_64".parse::<Arch>().is_err());
    assert!("a@sha256:0123".parse::<PinnedImage>().is_err());
    let d = format!("alpine:3@sha256:{}", "0".repeat(64));
    assert!(d.parse::<PinnedImage>().is_ok());
    assert!("alpine:3".parse::<PinnedImage>().is_err());
    assert!("Alpine".parse::<ImageName>().is_err());
}
