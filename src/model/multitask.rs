//! Several tasks on one frozen trunk: a single ONNX graph that computes what tasks share once
//! per frame, and what differs once per distinct version.
//!
//! Built on the protobuf before tract parses it, as adapter merges are. Every value of the graph
//! has, for each task, a *version*. A weight's is the base's unless the task changes it, then
//! the task's own. A node's is the base's when all its inputs are; otherwise the tasks whose
//! inputs have the same versions share one, named after the first of them. Each node is emitted
//! once per distinct version: the base's under its own names, the others renamed
//! `<name>::task<k>`. The layers no task changes (the trunk) thus run once, and a head-only task
//! next to a neck task still shares the base's neck with any other head-only task. The base's
//! weights are held once and each task holds the weights it changes (two tasks that change a
//! weight to the same values still hold a copy each).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ops::Range;

use tract_onnx::pb;

use super::weights::{FLOAT, dims, f32_values};
use super::{Calibration, ModelError, OnnxModel};

/// One task of a shared-trunk model.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskInfo {
    /// The name the task was given (an adapter's name).
    pub name: String,
    /// Class names of the task's model (its `names` metadata), when it has them.
    pub names: Option<Vec<String>>,
    /// Indices of this task's outputs among the model's outputs, in the base's output order.
    pub outputs: Range<usize>,
}

/// How a shared-trunk graph splits the base model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TrunkSplit {
    /// Nodes of the base graph.
    pub base_nodes: usize,
    /// Base nodes that run once for all tasks (the trunk).
    pub shared_nodes: usize,
    /// Nodes the shared graph runs per frame (every distinct version of every base node, without
    /// the `Identity` nodes that name the outputs); `tasks * base_nodes` would be separate
    /// models.
    pub nodes: usize,
    /// Float weight values the shared graph holds; `tasks * base_weights` would be separate
    /// models.
    pub weights: usize,
    /// Float weight values of the base.
    pub base_weights: usize,
}

/// Suffix of task `k`'s copy of a value or node name.
fn renamed(name: &str, k: usize) -> String {
    format!("{name}::task{k}")
}

fn same_values(a: &pb::TensorProto, b: &pb::TensorProto) -> bool {
    if a == b {
        return true;
    }
    if a.data_type != b.data_type || a.dims != b.dims {
        return false;
    }
    match (f32_values(a), f32_values(b)) {
        (Some(x), Some(y)) => {
            x.len() == y.len() && x.iter().zip(&y).all(|(p, q)| p.to_bits() == q.to_bits())
        }
        _ => false,
    }
}

impl OnnxModel {
    /// Tasks of a model built by [`OnnxModel::shared_trunk`]; empty for any other model (which
    /// is one task whose outputs are all the graph's outputs).
    pub fn tasks(&self) -> &[TaskInfo] {
        &self.tasks
    }

    /// One model running `tasks` (each this base model with other weight values, e.g. an
    /// adapter merged, and its name) on a shared trunk; its outputs are every task's outputs
    /// in turn, as [`OnnxModel::tasks`] lists them.
    ///
    /// Fails with [`ModelError::Unsupported`] for fewer than two tasks (one task is its own
    /// model), for a task whose graph is not this one's, for graphs with control flow
    /// (subgraph attributes), and when a renamed value would collide with an existing name.
    pub fn shared_trunk(
        &self,
        tasks: &[(String, &OnnxModel)],
    ) -> Result<(OnnxModel, TrunkSplit), ModelError> {
        let unsupported = |reason: String| ModelError::Unsupported {
            path: self.path.clone(),
            reason: format!("shared trunk: {reason}"),
        };
        if tasks.len() < 2 {
            return Err(unsupported(format!(
                "needs at least two tasks, got {}",
                tasks.len()
            )));
        }
        let graph = self
            .proto
            .graph
            .as_ref()
            .ok_or_else(|| unsupported("no graph".into()))?;
        if !self.tasks.is_empty() {
            return Err(unsupported("the base is already a multi-task model".into()));
        }
        if let Some(n) = graph.node.iter().find(|n| {
            n.attribute
                .iter()
                .any(|a| a.g.is_some() || !a.graphs.is_empty())
        }) {
            return Err(unsupported(format!(
                "node '{}' ({}) has a subgraph; control flow is not supported",
                n.name, n.op_type
            )));
        }
        // Which initializers each task changes.
        let mut changed: Vec<HashSet<&str>> = Vec::with_capacity(tasks.len());
        let mut task_inits: Vec<HashMap<&str, &pb::TensorProto>> = Vec::new();
        for (name, model) in tasks {
            let other = model.proto.graph.as_ref().filter(|g| {
                g.node.len() == graph.node.len()
                    && g.initializer.len() == graph.initializer.len()
                    && g.node.iter().zip(&graph.node).all(|(a, b)| {
                        a.op_type == b.op_type && a.input == b.input && a.output == b.output
                    })
            });
            let Some(other) = other else {
                return Err(unsupported(format!(
                    "task '{name}' ({}) is not this model with other weights",
                    model.path.display()
                )));
            };
            let inits: HashMap<&str, &pb::TensorProto> = other
                .initializer
                .iter()
                .map(|t| (t.name.as_str(), t))
                .collect();
            let mut set = HashSet::new();
            for t in &graph.initializer {
                match inits.get(t.name.as_str()) {
                    Some(o) if same_values(t, o) => {}
                    Some(o) if o.data_type == t.data_type && o.dims == t.dims => {
                        set.insert(t.name.as_str());
                    }
                    _ => {
                        return Err(unsupported(format!(
                            "task '{name}': initializer '{}' is missing or has another type or shape",
                            t.name
                        )));
                    }
                }
            }
            changed.push(set);
            task_inits.push(inits);
        }
        let inits: HashMap<&str, &pb::TensorProto> = graph
            .initializer
            .iter()
            .map(|t| (t.name.as_str(), t))
            .collect();
        let k_tasks = tasks.len();
        // version[value][k]: None = the base's, Some(j) = task j's copy.
        let mut version: HashMap<&str, Vec<Option<usize>>> = HashMap::new();
        for (k, set) in changed.iter().enumerate() {
            for n in set {
                version.entry(n).or_insert_with(|| vec![None; k_tasks])[k] = Some(k);
            }
        }
        let base_version = vec![None; k_tasks];
        let name_of = |v: &str, ver: Option<usize>| match ver {
            None => v.to_string(),
            Some(j) => renamed(v, j),
        };

        // Every name in use, to refuse a renaming that would collide.
        let mut names: HashSet<&str> = inits.keys().copied().collect();
        names.extend(graph.input.iter().map(|i| i.name.as_str()));
        names.extend(
            graph
                .node
                .iter()
                .flat_map(|n| n.output.iter().map(String::as_str)),
        );
        names.extend(graph.node.iter().map(|n| n.name.as_str()));
        let check = |r: String| -> Result<String, ModelError> {
            if names.contains(r.as_str()) {
                Err(unsupported(format!("value name '{r}' is already in use")))
            } else {
                Ok(r)
            }
        };

        let mut split = TrunkSplit {
            base_nodes: graph.node.len(),
            ..TrunkSplit::default()
        };
        let mut out = graph.clone();
        out.node = Vec::with_capacity(graph.node.len() * 2);
        out.output = Vec::new();
        let mut read: HashSet<String> = HashSet::new();
        for n in &graph.node {
            // The tasks grouped by the versions of this node's inputs.
            let keys: Vec<Vec<Option<usize>>> = (0..k_tasks)
                .map(|k| {
                    n.input
                        .iter()
                        .map(|i| version.get(i.as_str()).and_then(|v| v[k]))
                        .collect()
                })
                .collect();
            let mut out_version = vec![None; k_tasks];
            let mut emitted: Vec<(&Vec<Option<usize>>, Option<usize>)> = Vec::new();
            for k in 0..k_tasks {
                if let Some((_, ver)) = emitted.iter().find(|(key, _)| **key == keys[k]) {
                    out_version[k] = *ver;
                    continue;
                }
                let ver = keys[k].iter().any(Option::is_some).then_some(k);
                let mut c = n.clone();
                if let Some(j) = ver {
                    if !c.name.is_empty() {
                        c.name = check(renamed(&c.name, j))?;
                    }
                    // An omitted optional output ("") stays omitted.
                    c.output = n
                        .output
                        .iter()
                        .map(|o| match o.is_empty() {
                            true => Ok(String::new()),
                            false => check(renamed(o, j)),
                        })
                        .collect::<Result<_, _>>()?;
                }
                c.input = n
                    .input
                    .iter()
                    .zip(&keys[k])
                    .map(|(i, v)| name_of(i, *v))
                    .collect();
                read.extend(c.input.iter().cloned());
                out.node.push(c);
                out_version[k] = ver;
                emitted.push((&keys[k], ver));
            }
            split.shared_nodes += usize::from(emitted.len() == 1);
            if out_version != base_version {
                for o in n.output.iter().filter(|o| !o.is_empty()) {
                    version.insert(o, out_version.clone());
                }
            }
        }
        split.nodes = out.node.len();

        let mut task_infos = Vec::with_capacity(k_tasks);
        for (k, (name, model)) in tasks.iter().enumerate() {
            let first = out.output.len();
            for o in &graph.output {
                let ver = version.get(o.name.as_str()).and_then(|v| v[k]);
                let mut info = o.clone();
                info.name = check(renamed(&o.name, k))?;
                if ver != Some(k) {
                    // The output is computed by the base's or another task's copy: this task
                    // reads it under its own name.
                    let source = name_of(&o.name, ver);
                    out.node.push(pb::NodeProto {
                        op_type: "Identity".into(),
                        name: check(renamed(&format!("perch_output_{}", o.name), k))?,
                        input: vec![source.clone()],
                        output: vec![info.name.clone()],
                        ..Default::default()
                    });
                    read.insert(source);
                }
                out.output.push(info);
            }
            task_infos.push(TaskInfo {
                name: name.clone(),
                names: model.metadata.names.clone(),
                outputs: first..out.output.len(),
            });
        }
        // Initializers: the base's that some node still reads, and each task's changed ones.
        out.initializer.retain(|t| read.contains(&t.name));
        // In the base's order, so that task sets of the same shape give the same graph.
        for (k, set) in changed.iter().enumerate() {
            for n in graph.initializer.iter().map(|t| t.name.as_str()) {
                if !set.contains(n) {
                    continue;
                }
                let r = renamed(n, k);
                if read.contains(&r) {
                    let mut t = task_inits[k][n].clone();
                    t.name = check(r)?;
                    out.initializer.push(t);
                }
            }
        }
        out.input
            .retain(|i| !inits.contains_key(i.name.as_str()) || read.contains(&i.name));
        let float_values = |ts: &[pb::TensorProto]| -> usize {
            ts.iter()
                .filter(|t| t.data_type == FLOAT)
                .map(|t| dims(t).iter().product::<usize>())
                .sum()
        };
        split.weights = float_values(&out.initializer);
        split.base_weights = float_values(&graph.initializer);
        let mut infos = Vec::new();
        for v in &graph.value_info {
            let mut vers: Vec<Option<usize>> = version
                .get(v.name.as_str())
                .map_or(vec![None], |x| x.clone());
            vers.sort();
            vers.dedup();
            for ver in vers {
                let mut c = v.clone();
                c.name = name_of(&v.name, ver);
                infos.push(c);
            }
        }
        out.value_info = infos;
        let output_names = out.output.iter().map(|o| o.name.clone()).collect();
        // Field by field, so that the base's weights are not copied once more only to be dropped.
        let p = &self.proto;
        let proto = pb::ModelProto {
            ir_version: p.ir_version,
            opset_import: p.opset_import.clone(),
            producer_name: p.producer_name.clone(),
            producer_version: p.producer_version.clone(),
            domain: p.domain.clone(),
            model_version: p.model_version,
            doc_string: p.doc_string.clone(),
            graph: Some(out),
            metadata_props: p.metadata_props.clone(),
            training_info: p.training_info.clone(),
            functions: p.functions.clone(),
        };
        log::info!(
            "{}: {} tasks on a shared trunk of {} of {} nodes: {} nodes and {} weights run (separate models: {} and {})",
            self.path.display(),
            k_tasks,
            split.shared_nodes,
            split.base_nodes,
            split.nodes,
            split.weights,
            k_tasks * split.base_nodes,
            k_tasks * split.base_weights,
        );
        Ok((
            OnnxModel {
                path: self.path.clone(),
                proto,
                metadata: self.metadata.clone(),
                input_name: self.input_name.clone(),
                input_shape: self.input_shape,
                output_names,
                fingerprint: std::sync::OnceLock::new(),
                graphs: Default::default(),
                tasks: task_infos,
            },
            split,
        ))
    }
}

impl OnnxModel {
    /// int8 activation ranges for a shared-trunk model from each task's own (`per_task[k]`
    /// measured on task `k`'s model, in [`OnnxModel::tasks`] order): a task's value keeps its
    /// range under its renamed name; a trunk value takes the largest range any task measured.
    /// For any other model, the first calibration unchanged.
    pub fn task_calibration(&self, per_task: &[&Calibration]) -> Option<Calibration> {
        let first = *per_task.first()?;
        if self.tasks.is_empty() {
            return Some(first.clone());
        }
        let produced: HashSet<&str> = self
            .proto
            .graph
            .iter()
            .flat_map(|g| {
                g.node
                    .iter()
                    .flat_map(|n| n.output.iter().map(String::as_str))
            })
            .collect();
        let mut absmax: BTreeMap<String, f32> = BTreeMap::new();
        for (k, cal) in per_task.iter().enumerate() {
            for (key, v) in &cal.absmax {
                let own = renamed(key, k);
                let key = if produced.contains(own.as_str()) {
                    own
                } else {
                    key.clone()
                };
                let e = absmax.entry(key).or_insert(*v);
                *e = e.max(*v);
            }
        }
        Some(Calibration {
            version: first.version,
            model_fingerprint: self.fingerprint(),
            images: per_task.iter().map(|c| c.images).min().unwrap_or(0),
            absmax,
        })
    }
}
