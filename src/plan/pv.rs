//! PersistentVolume objects disklet publishes: names, labels, annotations and
//! the spec, built purely from the volume, the Node and the StorageClass.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    LocalVolumeSource, NodeSelector, NodeSelectorRequirement, NodeSelectorTerm, PersistentVolume,
    PersistentVolumeSpec, VolumeNodeAffinity,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use crate::config::VolumeMode;
use crate::model::keys::{
    node_label_value, pv_name, ANN_KEY, ANN_NODE_UID, ANN_PROVISIONED_BY, HOSTNAME_LABEL,
    LABEL_CLASS, LABEL_NODE, PROVISIONER,
};
use crate::model::quantity::exact;
use crate::model::{NodeInfo, ScInfo, Volume};

/// The PV for a volume. Every field disklet owns is set here, and only those,
/// so server-side apply with the `disklet` field manager converges to it.
pub fn build_pv(
    v: &Volume,
    node: &NodeInfo,
    sc_name: &str,
    sc: &ScInfo,
    topology_keys: &[String],
) -> PersistentVolume {
    let mut labels = BTreeMap::new();
    labels.insert(LABEL_NODE.to_string(), node_label_value(&node.name));
    labels.insert(LABEL_CLASS.to_string(), v.class.clone());
    labels.insert(HOSTNAME_LABEL.to_string(), node.hostname.clone());
    let mut annotations = v.annotations.clone();
    annotations.insert(ANN_PROVISIONED_BY.to_string(), PROVISIONER.to_string());
    annotations.insert(ANN_KEY.to_string(), v.key.clone());
    annotations.insert(ANN_NODE_UID.to_string(), node.uid.clone());

    let mut exprs = vec![NodeSelectorRequirement {
        key: HOSTNAME_LABEL.to_string(),
        operator: "In".to_string(),
        values: Some(vec![node.hostname.clone()]),
    }];
    for k in topology_keys {
        if let Some(val) = node.labels.get(k) {
            exprs.push(NodeSelectorRequirement {
                key: k.clone(),
                operator: "In".to_string(),
                values: Some(vec![val.clone()]),
            });
        }
    }
    PersistentVolume {
        metadata: ObjectMeta {
            name: Some(pv_name(&node.name, &v.class, &v.key)),
            labels: Some(labels),
            annotations: Some(annotations),
            ..ObjectMeta::default()
        },
        spec: Some(PersistentVolumeSpec {
            capacity: Some([("storage".to_string(), Quantity(exact(v.capacity_bytes)))].into()),
            access_modes: Some(vec![v.access_mode.as_str().to_string()]),
            volume_mode: Some(match v.mode {
                VolumeMode::Filesystem => "Filesystem".to_string(),
                VolumeMode::Block => "Block".to_string(),
            }),
            storage_class_name: Some(sc_name.to_string()),
            persistent_volume_reclaim_policy: Some(sc.reclaim_policy.clone()),
            mount_options: (!sc.mount_options.is_empty() && v.mode == VolumeMode::Filesystem)
                .then(|| sc.mount_options.clone()),
            local: Some(LocalVolumeSource {
                path: v.path.to_string_lossy().into_owned(),
                fs_type: v.fs_type.clone(),
            }),
            node_affinity: Some(VolumeNodeAffinity {
                required: Some(NodeSelector {
                    node_selector_terms: vec![NodeSelectorTerm {
                        match_expressions: Some(exprs),
                        match_fields: None,
                    }],
                }),
            }),
            ..PersistentVolumeSpec::default()
        }),
        status: None,
    }
}

/// Whether an existing PV already says what `desired` says, for the fields
/// disklet owns. Only the mutable ones matter: the API server refuses changes
/// to the volume source and node affinity anyway.
pub fn up_to_date(existing: &PersistentVolume, desired: &PersistentVolume) -> bool {
    let sub = |have: &Option<BTreeMap<String, String>>, want: &Option<BTreeMap<String, String>>| {
        want.iter()
            .flatten()
            .all(|(k, v)| have.as_ref().and_then(|h| h.get(k)) == Some(v))
    };
    let (Some(es), Some(ds)) = (&existing.spec, &desired.spec) else {
        return false;
    };
    sub(&existing.metadata.labels, &desired.metadata.labels)
        && sub(
            &existing.metadata.annotations,
            &desired.metadata.annotations,
        )
        && es.capacity == ds.capacity
        && es.storage_class_name == ds.storage_class_name
        && es.persistent_volume_reclaim_policy == ds.persistent_volume_reclaim_policy
        && es.mount_options == ds.mount_options
        && es.local == ds.local
}

/// The fields of `existing` that differ from `desired` and that the API
/// server never lets change on an existing PV (`spec.local`,
/// `spec.nodeAffinity`, `spec.volumeMode`): only a delete and a create (a
/// `kubectl replace --force`, or disklet publishing anew) can set them.
/// Node selector terms compare as sets, so a reordering is no difference.
pub fn immutable_differences(
    existing: &PersistentVolume,
    desired: &PersistentVolume,
) -> Vec<&'static str> {
    let (Some(es), Some(ds)) = (&existing.spec, &desired.spec) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    let local = |s: &PersistentVolumeSpec| {
        s.local
            .as_ref()
            .map(|l| (l.path.clone(), l.fs_type.clone().filter(|f| !f.is_empty())))
    };
    if local(es) != local(ds) {
        out.push("spec.local");
    }
    if affinity_terms(es) != affinity_terms(ds) {
        out.push("spec.nodeAffinity");
    }
    let mode =
        |s: &PersistentVolumeSpec| s.volume_mode.clone().unwrap_or_else(|| "Filesystem".into());
    if mode(es) != mode(ds) {
        out.push("spec.volumeMode");
    }
    out
}

/// Required node affinity as a sorted set of terms, each a sorted set of
/// (key, operator, sorted values) for expressions and fields.
type Requirement = (String, String, Vec<String>);
fn affinity_terms(s: &PersistentVolumeSpec) -> Vec<(Vec<Requirement>, Vec<Requirement>)> {
    let norm = |r: &Option<Vec<NodeSelectorRequirement>>| {
        let mut v: Vec<Requirement> = r
            .iter()
            .flatten()
            .map(|e| {
                let mut vals = e.values.clone().unwrap_or_default();
                vals.sort();
                (e.key.clone(), e.operator.clone(), vals)
            })
            .collect();
        v.sort();
        v
    };
    let mut terms: Vec<_> = s
        .node_affinity
        .as_ref()
        .and_then(|a| a.required.as_ref())
        .map(|r| r.node_selector_terms.as_slice())
        .unwrap_or_default()
        .iter()
        .map(|t| (norm(&t.match_expressions), norm(&t.match_fields)))
        .collect();
    terms.sort();
    terms
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::keys::ANN_FS_UUID;
    use std::path::PathBuf;

    fn node() -> NodeInfo {
        NodeInfo {
            name: "node-a".into(),
            uid: "uid-1".into(),
            hostname: "node-a.example.com".into(),
            labels: [
                ("topology.kubernetes.io/zone".to_string(), "z1".to_string()),
                ("rack".to_string(), "r7".to_string()),
            ]
            .into(),
        }
    }

    fn vol() -> Volume {
        Volume {
            key: "fs:1234".into(),
            class: "fast".into(),
            mode: VolumeMode::Filesystem,
            access_mode: Default::default(),
            path: PathBuf::from("/var/lib/disklet/fast/1234/vol"),
            capacity_bytes: 322_961_408,
            fs_type: None,
            annotations: [(ANN_FS_UUID.to_string(), "1234".to_string())].into(),
            create_blocked: None,
        }
    }

    #[test]
    fn pv_has_every_field() {
        let sc = ScInfo {
            reclaim_policy: "Delete".into(),
            mount_options: vec!["noatime".into()],
            ..Default::default()
        };
        let pv = build_pv(
            &vol(),
            &node(),
            "local-fast",
            &sc,
            &[
                "topology.kubernetes.io/zone".into(),
                "rack".into(),
                "missing".into(),
            ],
        );
        let v = serde_json::to_value(&pv).unwrap();
        assert_eq!(v["metadata"]["labels"]["disklet.io/node"], "node-a");
        assert_eq!(v["metadata"]["labels"]["disklet.io/class"], "fast");
        assert_eq!(
            v["metadata"]["labels"]["kubernetes.io/hostname"],
            "node-a.example.com"
        );
        assert_eq!(
            v["metadata"]["annotations"]["pv.kubernetes.io/provisioned-by"],
            "disklet"
        );
        assert_eq!(v["metadata"]["annotations"]["disklet.io/fs-uuid"], "1234");
        let s = &v["spec"];
        assert_eq!(s["capacity"]["storage"], "308Mi");
        assert_eq!(crate::model::quantity::exact(268435456), "256Mi");
        assert_eq!(crate::model::quantity::exact(1 << 40), "1Ti");
        assert_eq!(crate::model::quantity::exact(1000), "1000");
        assert_eq!(crate::model::quantity::exact(0), "0");
        assert_eq!(s["accessModes"], serde_json::json!(["ReadWriteOnce"]));
        assert_eq!(s["volumeMode"], "Filesystem");
        assert_eq!(s["storageClassName"], "local-fast");
        assert_eq!(s["persistentVolumeReclaimPolicy"], "Delete");
        assert_eq!(s["mountOptions"], serde_json::json!(["noatime"]));
        assert_eq!(s["local"]["path"], "/var/lib/disklet/fast/1234/vol");
        let exprs = &s["nodeAffinity"]["required"]["nodeSelectorTerms"][0]["matchExpressions"];
        assert_eq!(
            exprs[0],
            serde_json::json!({"key": "kubernetes.io/hostname", "operator": "In", "values": ["node-a.example.com"]})
        );
        assert_eq!(exprs[1]["values"], serde_json::json!(["z1"]));
        assert_eq!(exprs[2]["key"], "rack");
        assert_eq!(
            exprs.as_array().unwrap().len(),
            3,
            "a topology key the node lacks is left out"
        );
        assert!(up_to_date(&pv, &pv));
        let mut changed = pv.clone();
        changed.spec.as_mut().unwrap().capacity =
            Some([("storage".to_string(), Quantity("1".into()))].into());
        assert!(!up_to_date(&changed, &pv));
        assert!(immutable_differences(&pv, &pv).is_empty());
        assert!(
            immutable_differences(&changed, &pv).is_empty(),
            "capacity may change"
        );
        let mut moved = pv.clone();
        moved.spec.as_mut().unwrap().local.as_mut().unwrap().path = "/elsewhere".into();
        fn exprs_of(p: &mut PersistentVolume) -> &mut Vec<NodeSelectorRequirement> {
            let a = p.spec.as_mut().unwrap().node_affinity.as_mut().unwrap();
            a.required.as_mut().unwrap().node_selector_terms[0]
                .match_expressions
                .as_mut()
                .unwrap()
        }
        exprs_of(&mut moved).reverse();
        assert_eq!(
            immutable_differences(&moved, &pv),
            ["spec.local"],
            "reordered expressions are the same affinity"
        );
        exprs_of(&mut moved)[0].values = Some(vec!["node-b".into()]);
        assert_eq!(
            immutable_differences(&moved, &pv),
            ["spec.local", "spec.nodeAffinity"]
        );
    }
}
