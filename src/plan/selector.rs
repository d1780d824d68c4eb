//! Class selectors compiled once from the config.

use globset::{Glob, GlobBuilder, GlobMatcher, GlobSet, GlobSetBuilder};

use crate::config::{Class, Config};
use crate::model::Device;

/// A class with its globs compiled.
#[derive(Debug, Clone)]
pub struct CompiledClass {
    pub class: Class,
    paths: GlobSet,
    udev: Vec<(String, GlobMatcher)>,
    backing: GlobSet,
}

/// All classes of a config, in config order (the first class whose selector
/// names a device is the device's class).
#[derive(Debug, Clone, Default)]
pub struct Classes {
    pub classes: Vec<CompiledClass>,
}

fn glob(pattern: &str) -> Result<Glob, globset::Error> {
    GlobBuilder::new(pattern).literal_separator(true).build()
}

impl Classes {
    pub fn compile(cfg: &Config) -> Result<Classes, globset::Error> {
        let mut classes = Vec::with_capacity(cfg.classes.len());
        for c in &cfg.classes {
            let mut b = GlobSetBuilder::new();
            for p in &c.selector.paths {
                b.add(glob(p)?);
            }
            let mut bf = GlobSetBuilder::new();
            for p in &c.selector.backing_files {
                bf.add(glob(p)?);
            }
            let mut udev = Vec::new();
            for (k, v) in &c.selector.udev {
                udev.push((k.clone(), glob(v)?.compile_matcher()));
            }
            classes.push(CompiledClass {
                class: c.clone(),
                paths: b.build()?,
                udev,
                backing: bf.build()?,
            });
        }
        Ok(Classes { classes })
    }

    /// The first class whose selector names this device.
    pub fn matching(&self, dev: &Device) -> Option<&CompiledClass> {
        self.classes.iter().find(|c| c.names(dev))
    }
}

impl CompiledClass {
    /// Whether the selector's identifying fields (paths, udev, rotational) all
    /// match. Size and kind are checked afterwards, so that a device the admin
    /// named but that does not qualify gets a precise refusal.
    pub fn names(&self, dev: &Device) -> bool {
        let sel = &self.class.selector;
        if sel.names_nothing() {
            // Never let an empty selector match everything.
            return false;
        }
        if !sel.backing_files.is_empty() {
            let hit = dev
                .loop_backing_file
                .as_ref()
                .is_some_and(|f| self.backing.is_match(f));
            if !hit {
                return false;
            }
        }
        if !sel.paths.is_empty() {
            let hit = std::iter::once(&dev.devnode)
                .chain(dev.links.iter())
                .any(|p| self.paths.is_match(p));
            if !hit {
                return false;
            }
        }
        if !self.udev.is_empty() {
            let Some(props) = dev.udev_properties() else {
                return false;
            };
            let all = self
                .udev
                .iter()
                .all(|(k, m)| props.get(k).is_some_and(|v| m.is_match(v)));
            if !all {
                return false;
            }
        }
        match sel.rotational {
            Some(want) => dev.rotational == Some(want),
            None => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{DevNo, DeviceKind, UdevState};
    use std::path::PathBuf;

    fn classes(yaml: &str) -> Classes {
        Classes::compile(&Config::parse(yaml).unwrap()).unwrap()
    }

    fn nvme() -> Device {
        let mut d = Device::new("nvme0n1", DevNo::new(259, 0), DeviceKind::Disk);
        d.links = vec![PathBuf::from("/dev/disk/by-id/nvme-Samsung_SSD_980_S1")];
        d.rotational = Some(false);
        d
    }

    #[test]
    fn path_globs_match_node_or_links_and_star_stays_in_one_component() {
        let c = classes("classes: [{name: a, selector: {paths: ['/dev/disk/by-id/nvme-*']}}]");
        assert!(c.matching(&nvme()).is_some());
        let c = classes("classes: [{name: a, selector: {paths: ['/dev/nvme*']}}]");
        assert!(c.matching(&nvme()).is_some());
        let c = classes("classes: [{name: a, selector: {paths: ['/dev/n*']}}]");
        assert!(
            c.matching(&nvme()).is_some(),
            "devnode /dev/nvme0n1 is one component"
        );
        let c = classes("classes: [{name: a, selector: {paths: ['/dev/disk/by*']}}]");
        assert!(c.matching(&nvme()).is_none(), "* must not cross /");
    }

    #[test]
    fn udev_globs_need_udev_data() {
        let c = classes("classes: [{name: a, selector: {udev: {DISKLET_CLASS: fa*}}}]");
        let mut d = nvme();
        assert!(c.matching(&d).is_none(), "no udev data, no match");
        d.udev = UdevState::Processed {
            properties: [("DISKLET_CLASS".to_string(), "fast".to_string())].into(),
        };
        assert!(c.matching(&d).is_some());
        d.udev = UdevState::Processed {
            properties: [("DISKLET_CLASS".to_string(), "slow".to_string())].into(),
        };
        assert!(c.matching(&d).is_none());
    }

    #[test]
    fn backing_file_globs_select_loops_by_their_file() {
        let c = classes(
            "classes: [{name: a, selector: {backingFiles: ['/tmp/t1/*.img'], types: [loop]}}]",
        );
        let mut d = Device::new("loop4", crate::model::DevNo::new(7, 4), DeviceKind::Loop);
        assert!(c.matching(&d).is_none(), "no backing file");
        d.loop_backing_file = Some(PathBuf::from("/tmp/t1/a.img"));
        assert!(c.matching(&d).is_some());
        d.loop_backing_file = Some(PathBuf::from("/tmp/t1/sub/a.img"));
        assert!(c.matching(&d).is_none(), "* stays in one component");
        let c = classes("classes: [{name: dirs-only, discoveryDirs: [/mnt/disks]}]");
        assert!(
            c.matching(&nvme()).is_none(),
            "a class without a selector names no disk"
        );
    }

    #[test]
    fn all_given_fields_must_match_and_first_class_wins() {
        let c = classes(
            "classes: [{name: hdd, selector: {paths: ['/dev/nvme*'], rotational: true}}, {name: ssd, selector: {paths: ['/dev/nvme*']}}, {name: any, selector: {paths: ['/dev/n*']}}]",
        );
        assert_eq!(c.matching(&nvme()).unwrap().class.name, "ssd");
        let mut d = nvme();
        d.rotational = None;
        assert_eq!(
            c.matching(&d).unwrap().class.name,
            "ssd",
            "unknown rotational fails hdd"
        );
    }
}
