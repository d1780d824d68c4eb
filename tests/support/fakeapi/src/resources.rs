//! Static registry of the resource types the fake API server serves.

/// Which extra field selectors a resource supports beyond `metadata.name`
/// and `metadata.namespace`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldSet {
    /// Only the generic metadata fields.
    Meta,
    /// `status.phase`, `spec.claimRef.name`, `spec.claimRef.namespace`, `spec.storageClassName`.
    PersistentVolume,
    /// `status.phase`, `spec.volumeName`, `spec.storageClassName`.
    PersistentVolumeClaim,
    /// `spec.unschedulable`.
    Node,
    /// `status.phase`.
    Namespace,
    /// `involvedObject.*`, `reason`, `source`, `type`, ...
    CoreEvent,
    /// `regarding.*`, `reason`, `type`, ...
    EventsV1,
}

/// Description of one served resource type.
#[derive(Debug, Clone)]
pub struct ResourceInfo {
    /// API group ("" for core).
    pub group: &'static str,
    /// API version.
    pub version: &'static str,
    /// Plural resource name (URL segment).
    pub plural: &'static str,
    /// Singular name.
    pub singular: &'static str,
    /// Kind.
    pub kind: &'static str,
    /// Whether objects live in namespaces.
    pub namespaced: bool,
    /// Short names (`pv`, `pvc`, ...).
    pub short_names: &'static [&'static str],
    /// Whether a `/status` subresource exists.
    pub has_status: bool,
    /// Whether `status` sent on create is dropped (PrepareForCreate resets it).
    pub reset_status_on_create: bool,
    /// Whether the object is stored at all (SelfSubjectAccessReview is not).
    pub virtual_create_only: bool,
    /// Field selector support.
    pub fields: FieldSet,
    /// Categories reported by discovery.
    pub categories: &'static [&'static str],
}

impl ResourceInfo {
    /// `apiVersion` string ("v1" or "group/version").
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_string()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// Group-qualified resource name as used in error messages (`leases.coordination.k8s.io`).
    pub fn qualified(&self) -> String {
        if self.group.is_empty() {
            self.plural.to_string()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }

    /// Verbs for discovery.
    pub fn verbs(&self) -> Vec<&'static str> {
        if self.virtual_create_only {
            vec!["create"]
        } else {
            vec![
                "create",
                "delete",
                "deletecollection",
                "get",
                "list",
                "patch",
                "update",
                "watch",
            ]
        }
    }
}

/// All resource types served, in discovery order.
pub static RESOURCES: &[ResourceInfo] = &[
    ResourceInfo {
        group: "",
        version: "v1",
        plural: "namespaces",
        singular: "namespace",
        kind: "Namespace",
        namespaced: false,
        short_names: &["ns"],
        has_status: true,
        reset_status_on_create: true,
        virtual_create_only: false,
        fields: FieldSet::Namespace,
        categories: &[],
    },
    ResourceInfo {
        group: "",
        version: "v1",
        plural: "nodes",
        singular: "node",
        kind: "Node",
        namespaced: false,
        short_names: &["no"],
        has_status: true,
        reset_status_on_create: false,
        virtual_create_only: false,
        fields: FieldSet::Node,
        categories: &[],
    },
    ResourceInfo {
        group: "",
        version: "v1",
        plural: "persistentvolumes",
        singular: "persistentvolume",
        kind: "PersistentVolume",
        namespaced: false,
        short_names: &["pv"],
        has_status: true,
        reset_status_on_create: true,
        virtual_create_only: false,
        fields: FieldSet::PersistentVolume,
        categories: &[],
    },
    ResourceInfo {
        group: "",
        version: "v1",
        plural: "persistentvolumeclaims",
        singular: "persistentvolumeclaim",
        kind: "PersistentVolumeClaim",
        namespaced: true,
        short_names: &["pvc"],
        has_status: true,
        reset_status_on_create: true,
        virtual_create_only: false,
        fields: FieldSet::PersistentVolumeClaim,
        categories: &[],
    },
    ResourceInfo {
        group: "",
        version: "v1",
        plural: "events",
        singular: "event",
        kind: "Event",
        namespaced: true,
        short_names: &["ev"],
        has_status: false,
        reset_status_on_create: false,
        virtual_create_only: false,
        fields: FieldSet::CoreEvent,
        categories: &[],
    },
    ResourceInfo {
        group: "storage.k8s.io",
        version: "v1",
        plural: "storageclasses",
        singular: "storageclass",
        kind: "StorageClass",
        namespaced: false,
        short_names: &["sc"],
        has_status: false,
        reset_status_on_create: false,
        virtual_create_only: false,
        fields: FieldSet::Meta,
        categories: &[],
    },
    ResourceInfo {
        group: "events.k8s.io",
        version: "v1",
        plural: "events",
        singular: "event",
        kind: "Event",
        namespaced: true,
        short_names: &["ev"],
        has_status: false,
        reset_status_on_create: false,
        virtual_create_only: false,
        fields: FieldSet::EventsV1,
        categories: &[],
    },
    ResourceInfo {
        group: "coordination.k8s.io",
        version: "v1",
        plural: "leases",
        singular: "lease",
        kind: "Lease",
        namespaced: true,
        short_names: &[],
        has_status: false,
        reset_status_on_create: false,
        virtual_create_only: false,
        fields: FieldSet::Meta,
        categories: &[],
    },
    ResourceInfo {
        group: "authorization.k8s.io",
        version: "v1",
        plural: "selfsubjectaccessreviews",
        singular: "selfsubjectaccessreview",
        kind: "SelfSubjectAccessReview",
        namespaced: false,
        short_names: &[],
        has_status: false,
        reset_status_on_create: false,
        virtual_create_only: true,
        fields: FieldSet::Meta,
        categories: &[],
    },
];

/// Index of a resource in [`RESOURCES`].
pub type ResourceId = usize;

/// Look up a resource by group, version and plural.
pub fn lookup(group: &str, version: &str, plural: &str) -> Option<ResourceId> {
    RESOURCES
        .iter()
        .position(|r| r.group == group && r.version == version && r.plural == plural)
}

/// Look up a resource by `apiVersion` and `kind`.
pub fn lookup_kind(api_version: &str, kind: &str) -> Option<ResourceId> {
    let (group, version) = split_api_version(api_version);
    RESOURCES
        .iter()
        .position(|r| r.group == group && r.version == version && r.kind == kind)
}

/// Resolve a loose name as a test would write it: plural (`persistentvolumes`),
/// `plural.group` (`events.events.k8s.io`), singular, kind or short name.
/// Core group wins on ambiguity (as kubectl's preference does for `events`).
pub fn resolve(name: &str) -> Option<ResourceId> {
    if let Some(i) = RESOURCES.iter().position(|r| r.qualified() == name) {
        return Some(i);
    }
    let lower = name.to_ascii_lowercase();
    RESOURCES.iter().position(|r| {
        r.plural == lower
            || r.singular == lower
            || r.kind.eq_ignore_ascii_case(name)
            || r.short_names.contains(&lower.as_str())
    })
}

/// Split `group/version` (or `v1`).
pub fn split_api_version(api_version: &str) -> (&str, &str) {
    match api_version.split_once('/') {
        Some((g, v)) => (g, v),
        None => ("", api_version),
    }
}

/// Info for an id.
pub fn info(id: ResourceId) -> &'static ResourceInfo {
    &RESOURCES[id]
}

/// The distinct API groups (non-core) in discovery order, with their single version.
pub fn groups() -> Vec<(&'static str, &'static str)> {
    let mut out: Vec<(&'static str, &'static str)> = Vec::new();
    for r in RESOURCES {
        if !r.group.is_empty() && !out.iter().any(|(g, _)| *g == r.group) {
            out.push((r.group, r.version));
        }
    }
    out
}
