//! Kernel modules for an initramfs that boots a modular (Debian) kernel:
//! the named modules and everything they depend on, from a depmod'ed
//! `lib/modules/RELEASE` tree, plus `modules.dep` and `modules.alias`
//! restricted to what is included. PID 1 loads them by modalias at boot and
//! on the kernel's request (`/proc/sys/kernel/modprobe`).

use crate::initramfs::{InitramfsError, Node, Tree};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// `modules.dep` as a map: module path → its dependencies' paths.
pub fn parse_dep(text: &str) -> BTreeMap<String, Vec<String>> {
    text.lines()
        .filter_map(|l| {
            let (m, deps) = l.split_once(':')?;
            Some((
                m.trim().to_string(),
                deps.split_whitespace().map(str::to_string).collect(),
            ))
        })
        .collect()
}

/// A module's name from its path (`kernel/fs/ext4/ext4.ko` → `ext4`),
/// with `-` as `_` (the kernel treats them alike).
pub fn name_of(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    file.trim_end_matches(".ko").replace('-', "_")
}

/// Adds `names` (and their dependencies) under `lib/modules/RELEASE`;
/// returns how many module files went in. An unknown name is an error
/// naming it, unless the kernel has it built in.
pub fn add(tree: &mut Tree, root: &Path, names: &[String]) -> Result<usize, InitramfsError> {
    let release = root
        .file_name()
        .map(|r| r.to_string_lossy().into_owned())
        .unwrap_or_default();
    let read = |f: &str| {
        std::fs::read_to_string(root.join(f)).map_err(|e| InitramfsError::Read {
            what: "modules",
            path: root.join(f),
            source: e,
        })
    };
    let dep = parse_dep(&read("modules.dep")?);
    let builtin: BTreeSet<String> = read("modules.builtin")
        .unwrap_or_default()
        .lines()
        .map(name_of)
        .collect();
    let by_name: BTreeMap<String, &String> = dep.keys().map(|p| (name_of(p), p)).collect();
    let mut take: BTreeSet<String> = BTreeSet::new();
    for n in names {
        let n = n.replace('-', "_");
        match by_name.get(&n) {
            Some(p) => {
                take.insert((*p).clone());
                take.extend(dep[*p].iter().cloned());
            }
            None if builtin.contains(&n) => {}
            None => return Err(InitramfsError::UnknownModule(n)),
        }
    }
    let base = format!("lib/modules/{release}");
    let mut dep_out = String::new();
    for p in &take {
        let data = std::fs::read(root.join(p)).map_err(|e| InitramfsError::Read {
            what: "module",
            path: root.join(p),
            source: e,
        })?;
        let dest = format!("{base}/{p}");
        tree.create_parents(&dest)?;
        tree.insert(&dest, Node::File(data), 0o644)?;
        dep_out.push_str(&format!("{p}: {}\n", dep[p].join(" ")));
    }
    let names_in: BTreeSet<String> = take.iter().map(|p| name_of(p)).collect();
    let alias_out: String = read("modules.alias")?
        .lines()
        .filter(|l| {
            l.split_whitespace()
                .nth(2)
                .is_some_and(|m| names_in.contains(&m.replace('-', "_")))
        })
        .map(|l| format!("{l}\n"))
        .collect();
    tree.create_parents(&format!("{base}/modules.dep"))?;
    tree.insert(
        &format!("{base}/modules.dep"),
        Node::File(dep_out.into_bytes()),
        0o644,
    )?;
    tree.insert(
        &format!("{base}/modules.alias"),
        Node::File(alias_out.into_bytes()),
        0o644,
    )?;
    if let Ok(b) = read("modules.builtin") {
        tree.insert(
            &format!("{base}/modules.builtin"),
            Node::File(b.into_bytes()),
            0o644,
        )?;
    }
    Ok(take.len())
}

/// Module names from a list file: one per line, `#` comments.
pub fn read_list(path: &Path) -> Result<Vec<String>, InitramfsError> {
    let text = std::fs::read_to_string(path).map_err(|e| InitramfsError::Read {
        what: "module list",
        path: path.to_path_buf(),
        source: e,
    })?;
    Ok(text
        .lines()
        .map(|l| l.split('#').next().unwrap_or("").trim())
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deps_come_along_and_unknown_names_are_errors() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("6.1.0-test");
        std::fs::create_dir_all(root.join("kernel/fs/ext4")).unwrap();
        std::fs::create_dir_all(root.join("kernel/fs/jbd2")).unwrap();
        std::fs::write(root.join("kernel/fs/ext4/ext4.ko"), b"E").unwrap();
        std::fs::write(root.join("kernel/fs/jbd2/jbd2.ko"), b"J").unwrap();
        std::fs::write(
            root.join("modules.dep"),
            "kernel/fs/ext4/ext4.ko: kernel/fs/jbd2/jbd2.ko\nkernel/fs/jbd2/jbd2.ko:\n",
        )
        .unwrap();
        std::fs::write(
            root.join("modules.alias"),
            "alias fs-ext4 ext4\nalias fs-xfs xfs\n",
        )
        .unwrap();
        std::fs::write(root.join("modules.builtin"), "kernel/fs/proc.ko\n").unwrap();
        let mut tree = Tree::new();
        assert_eq!(
            add(&mut tree, &root, &["ext4".into(), "proc".into()]).unwrap(),
            2
        );
        assert!(tree
            .get("lib/modules/6.1.0-test/kernel/fs/jbd2/jbd2.ko")
            .is_some());
        match &tree
            .get("lib/modules/6.1.0-test/modules.alias")
            .unwrap()
            .node
        {
            Node::File(b) => assert_eq!(b, b"alias fs-ext4 ext4\n"),
            other => panic!("{other:?}"),
        }
        let e = add(&mut Tree::new(), &root, &["nope".into()]).unwrap_err();
        assert!(e.to_string().contains("nope"), "{e}");
        assert_eq!(name_of("kernel/drivers/net/virtio-net.ko"), "virtio_net");
    }
}
