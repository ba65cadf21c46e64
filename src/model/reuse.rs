//! Reuse of a decluttered graph by later prepares that differ from it only in weight values.
//!
//! Parsing, typing and decluttering depend on the graph's structure, not on the values of the
//! weights of its Conv/Gemm/MatMul layers, so an adapter merge (which changes those values and
//! nothing else) can start from the graph tract decluttered for the base and only swap the
//! constants. Declutter renames, reshapes and splits weights, so they are found by their bytes.
//! A weight is swappable when tract demonstrably kept its values as they were:
//! - in the ONNX graph it feeds exactly one node, a `Conv`, `ConvInteger`, `Gemm` or `MatMul`;
//! - its float values are held, each exactly once, by constants of the decluttered graph that
//!   each read as one [`Holder`] of it: the whole weight (maybe reshaped), runs of its rows, or
//!   blocks of its columns;
//! - each such constant feeds exactly one input (so it was not shared with an equal constant)
//!   and is not a value declutter may have specialised on (see [`plain_enough`]).
//!
//! Any other difference (another node, input size, precision rewrite, a changed value tract may
//! have folded) is a miss, and the caller runs the full pipeline.

use std::collections::HashMap;
use std::sync::Mutex;

use tract_onnx::pb;
use tract_onnx::prelude::*;
use tract_onnx::tract_core::ops::konst::Const;

/// Decluttered graphs kept for reuse, most recent last.
#[derive(Default)]
pub(super) struct GraphCache {
    entries: Mutex<Vec<std::sync::Arc<Entry>>>,
}

struct Entry {
    /// The protobuf that was parsed, with the data of swappable initializers dropped.
    key: pb::ModelProto,
    /// Swappable initializer names and the decluttered graph's nodes that hold each.
    swappable: HashMap<String, Vec<Holder>>,
    model: TypedModel,
}

/// How many decluttered graphs a model keeps (one per input size in use).
const KEEP: usize = 2;

const WEIGHT_CONSUMERS: [&str; 4] = ["Conv", "ConvInteger", "Gemm", "MatMul"];

fn load(t: &pb::TensorProto, model_dir: Option<&str>) -> TractResult<Tensor> {
    tract_onnx::tensor::load_tensor(&*tract_onnx::onnx().provider, t, model_dir)
}

fn same_header(a: &pb::TensorProto, b: &pb::TensorProto) -> bool {
    a.name == b.name
        && a.dims == b.dims
        && a.data_type == b.data_type
        && a.segment == b.segment
        && a.data_location == b.data_location
}

/// Everything of `proto` that parsing depends on, except the initializers.
fn same_structure(a: &pb::ModelProto, b: &pb::ModelProto) -> bool {
    let (Some(ga), Some(gb)) = (&a.graph, &b.graph) else {
        return false;
    };
    a.ir_version == b.ir_version
        && a.opset_import == b.opset_import
        && a.training_info == b.training_info
        && ga.node == gb.node
        && ga.input == gb.input
        && ga.output == gb.output
        && ga.value_info == gb.value_info
        && ga.sparse_initializer == gb.sparse_initializer
        && ga.initializer.len() == gb.initializer.len()
}

impl GraphCache {
    /// The graph decluttered from a protobuf that differs from `proto` only in the values of
    /// swappable weights, with `proto`'s values swapped in; `None` when no kept graph fits.
    /// Also returns how many constants were replaced.
    pub(super) fn lookup(
        &self,
        proto: &pb::ModelProto,
        model_dir: Option<&str>,
    ) -> Option<(TypedModel, usize)> {
        let entries = self.entries.lock().ok()?.clone();
        entries
            .iter()
            .rev()
            .find_map(|e| e.substitute(proto, model_dir))
    }

    /// Keeps `model`, decluttered from `proto`, for [`GraphCache::lookup`].
    pub(super) fn insert(
        &self,
        mut proto: pb::ModelProto,
        model: &TypedModel,
        model_dir: Option<&str>,
    ) {
        let t0 = std::time::Instant::now();
        let Some(graph) = proto.graph.as_mut() else {
            return;
        };
        let swappable = swappable(graph, model, model_dir);
        for init in graph.initializer.iter_mut() {
            if swappable.contains_key(&init.name) {
                init.raw_data = Vec::new();
                init.float_data = Vec::new();
                init.int32_data = Vec::new();
                init.int64_data = Vec::new();
                init.double_data = Vec::new();
                init.uint64_data = Vec::new();
            }
        }
        log::debug!(
            "kept the decluttered graph for reuse: {} of {} initializers swappable ({:.1} ms)",
            swappable.len(),
            graph.initializer.len(),
            t0.elapsed().as_secs_f64() * 1e3
        );
        let entry = std::sync::Arc::new(Entry {
            key: proto,
            swappable,
            model: model.clone(),
        });
        if let Ok(mut entries) = self.entries.lock() {
            if entries.len() >= KEEP {
                entries.remove(0);
            }
            entries.push(entry);
        }
    }
}

/// A constant of the decluttered graph that holds some of an initializer's values: the whole
/// of it (maybe reshaped), rows of it (tract split a product along its outputs) or a block of
/// columns (split along its inputs). Seen as `[rows, cols]` (the first axis against the others),
/// the constant is `width`-wide runs starting at element `start`, `stride` elements apart.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Holder {
    node: usize,
    start: usize,
    width: usize,
    stride: usize,
}

impl Holder {
    /// The element offsets in the initializer of the runs of a constant of `len` values.
    fn runs(&self, len: usize) -> impl Iterator<Item = std::ops::Range<usize>> + '_ {
        (0..len / self.width).map(move |i| {
            let s = self.start + i * self.stride;
            s..s + self.width
        })
    }

    /// Whether `run` (a constant) holds these values of `whole`.
    fn holds(&self, whole: &[u8], run: &[u8], size: usize) -> bool {
        let len = run.len() / size;
        len.is_multiple_of(self.width)
            && self
                .runs(len)
                .zip(run.chunks(self.width * size))
                .all(|(r, c)| whole.get(r.start * size..r.end * size) == Some(c))
    }

    /// The constant's values taken from `whole`.
    fn gather(&self, whole: &[u8], len: usize, size: usize) -> Option<Vec<u8>> {
        let mut out = Vec::with_capacity(len * size);
        for r in self.runs(len) {
            out.extend_from_slice(whole.get(r.start * size..r.end * size)?);
        }
        (out.len() == len * size).then_some(out)
    }
}

/// Whether declutter may have specialised on a constant: a uniform one is kept only when it is a
/// single value that no simplification rule singles out (0, 1, -1, non-finite).
fn plain_enough(t: &Tensor) -> bool {
    if t.len() >= 2 {
        return !t.is_uniform();
    }
    t.cast_to_scalar::<f64>()
        .is_ok_and(|v| v.is_finite() && v != 0.0 && v.abs() != 1.0)
}

/// The initializers of `graph` that are swappable in `model` (module documentation), each with
/// the constants that hold its values.
fn swappable(
    graph: &pb::GraphProto,
    model: &TypedModel,
    model_dir: Option<&str>,
) -> HashMap<String, Vec<Holder>> {
    let consumers = super::consumer_ops(graph);
    let outputs = model.output_outlets().unwrap_or(&[]);
    // Constants that may hold weights (plain, float, read by one input), by type and first value.
    let mut candidates: HashMap<(DatumType, Vec<u8>), Vec<usize>> = HashMap::new();
    for node in model.nodes() {
        if !node.op_is::<Const>() {
            continue;
        }
        let fact = &node.outputs[0].fact;
        let (Some(konst), None) = (&fact.konst, &fact.exotic_fact) else {
            continue;
        };
        let Ok(view) = konst.try_as_plain_ram() else {
            continue;
        };
        if !konst.datum_type().is_float()
            || konst.len() == 0
            || node.outputs[0].successors.len() != 1
            || outputs.iter().any(|o| o.node == node.id)
            || (fact.uniform.is_some() && !plain_enough(konst))
        {
            continue;
        }
        let size = konst.datum_type().size_of();
        candidates
            .entry((konst.datum_type(), view.as_bytes()[..size].to_vec()))
            .or_default()
            .push(node.id);
    }
    let konst = |id: usize| model.node(id).outputs[0].fact.konst.clone();
    let mut swappable: HashMap<String, Vec<Holder>> = HashMap::new();
    let mut held_by: HashMap<usize, usize> = HashMap::new();
    for init in &graph.initializer {
        let Some([op]) = consumers.get(init.name.as_str()).map(Vec::as_slice) else {
            continue;
        };
        if !WEIGHT_CONSUMERS.contains(op) {
            continue;
        }
        let Ok(t) = load(init, model_dir) else {
            continue;
        };
        let Ok(view) = t.try_as_plain_ram() else {
            continue;
        };
        let dt = t.datum_type();
        if !dt.is_float() || t.len() == 0 || !plain_enough(&t) {
            continue;
        }
        let bytes = view.as_bytes();
        let size = dt.size_of();
        let cols = t.shape().iter().skip(1).product::<usize>().max(1);
        let rows = t.len() / cols;
        let mut found: Vec<Holder> = Vec::new();
        let add = |h: Holder, found: &mut Vec<Holder>| {
            let Some(k) = konst(h.node) else { return };
            let Ok(kv) = k.try_as_plain_ram() else { return };
            if h.holds(bytes, kv.as_bytes(), size) && !found.contains(&h) {
                found.push(h);
            }
        };
        let first = |e: usize| (dt, bytes[e * size..(e + 1) * size].to_vec());
        // Runs start at a row boundary, or at a column where row 0 has a constant's first value
        // (a split along the inputs); each is contiguous from a row start, or a block of
        // columns as wide as a trailing part of the constant's shape.
        let probe_cols: Vec<usize> = std::iter::once(0)
            .chain((1..cols).filter(|&c| candidates.contains_key(&first(c))))
            .collect();
        for r in 0..rows {
            for &c in &probe_cols {
                let start = r * cols + c;
                for &node in candidates.get(&first(start)).into_iter().flatten() {
                    let Some(k) = konst(node) else { continue };
                    let len = k.len();
                    if c == 0 {
                        let h = Holder {
                            node,
                            start,
                            width: len,
                            stride: len,
                        };
                        add(h, &mut found);
                    }
                    let mut width = 1;
                    for d in k.shape().iter().rev() {
                        width *= d;
                        if width < cols
                            && c + width <= cols
                            && len.is_multiple_of(width)
                            && r + len / width <= rows
                        {
                            let h = Holder {
                                node,
                                start,
                                width,
                                stride: cols,
                            };
                            add(h, &mut found);
                        }
                    }
                }
            }
        }
        // Every value held exactly once, by constants that each fit in one place only:
        // otherwise some values live in a form this cannot swap, or a run is ambiguous.
        let mut nodes: Vec<usize> = found.iter().map(|h| h.node).collect();
        nodes.sort_unstable();
        let unique = nodes.windows(2).all(|w| w[0] != w[1]);
        let mut count = vec![0u8; t.len()];
        for h in &found {
            let len = konst(h.node).map_or(0, |k| k.len());
            for r in h.runs(len) {
                for c in &mut count[r] {
                    *c = c.saturating_add(1);
                }
            }
        }
        if unique && !found.is_empty() && count.iter().all(|&c| c == 1) {
            for h in &found {
                *held_by.entry(h.node).or_default() += 1;
            }
            swappable.insert(init.name.clone(), found);
        }
    }
    // A constant that equal initializers share is not swappable for either.
    swappable.retain(|_, hs| hs.iter().all(|h| held_by[&h.node] == 1));
    swappable
}

impl Entry {
    fn substitute(
        &self,
        proto: &pb::ModelProto,
        model_dir: Option<&str>,
    ) -> Option<(TypedModel, usize)> {
        if !same_structure(proto, &self.key) {
            return None;
        }
        let (Some(g), Some(k)) = (&proto.graph, &self.key.graph) else {
            return None;
        };
        let mut replace = Vec::new();
        for (q, k) in g.initializer.iter().zip(&k.initializer) {
            match self.swappable.get(&k.name) {
                Some(holders) => {
                    if !same_header(q, k) {
                        return None;
                    }
                    let new = load(q, model_dir).ok()?;
                    let nv = new.try_as_plain_ram().ok()?;
                    let size = new.datum_type().size_of();
                    let changed = holders.iter().any(|h| {
                        let old = self.model.node(h.node).outputs[0].fact.konst.as_ref();
                        old.is_none_or(|old| {
                            old.datum_type() != new.datum_type()
                                || old
                                    .try_as_plain_ram()
                                    .is_ok_and(|o| !h.holds(nv.as_bytes(), o.as_bytes(), size))
                        })
                    });
                    if changed {
                        if !plain_enough(&new) {
                            return None;
                        }
                        replace.push((holders, new));
                    }
                }
                None if q == k => {}
                None => return None,
            }
        }
        let mut model = self.model.clone();
        let n = replace.len();
        for (holders, tensor) in replace {
            let view = tensor.try_as_plain_ram().ok()?;
            let size = tensor.datum_type().size_of();
            for h in holders {
                let shape = model.node(h.node).outputs[0]
                    .fact
                    .shape
                    .as_concrete()?
                    .to_vec();
                let len = shape.iter().product::<usize>();
                let bytes = h.gather(view.as_bytes(), len, size)?;
                // SAFETY: the datum type is a float (checked when the holder was recorded), a
                // plain value type, and `bytes` holds exactly `len` of them.
                let run = unsafe { Tensor::from_raw_dt(tensor.datum_type(), &shape, &bytes) }
                    .ok()?
                    .into_arc_tensor();
                if !plain_enough(&run) {
                    return None;
                }
                let fact = TypedFact::try_from(run.clone()).ok()?;
                let node = model.node_mut(h.node);
                node.op = Box::new(Const::new(run).ok()?);
                node.outputs[0].fact = fact;
            }
        }
        Some((model, n))
    }
}
