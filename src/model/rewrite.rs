//! Graph rewrites applied to the ONNX protobuf before tract parses it.
//!
//! `Softmax` -> `ReduceMax`, `Sub`, `Exp`, `ReduceSum`, `Div` over the same axis: the same
//! function (max-subtracted, numerically stable), which tract runs several times faster than
//! its own `Softmax` on the YOLO DFL head (16-value lanes over thousands of anchors).

use tract_onnx::pb;

const INT64: i32 = 7;

fn opset(proto: &pb::ModelProto) -> i64 {
    proto
        .opset_import
        .iter()
        .find(|o| o.domain.is_empty() || o.domain == "ai.onnx")
        .map_or(0, |o| o.version)
}

fn int_attr(name: &str, v: i64) -> pb::AttributeProto {
    pb::AttributeProto {
        name: name.into(),
        r#type: 2,
        i: v,
        ..Default::default()
    }
}

fn ints_attr(name: &str, v: &[i64]) -> pb::AttributeProto {
    pb::AttributeProto {
        name: name.into(),
        r#type: 7,
        ints: v.to_vec(),
        ..Default::default()
    }
}

fn node(
    op: &str,
    name: String,
    inputs: Vec<String>,
    output: String,
    attrs: Vec<pb::AttributeProto>,
) -> pb::NodeProto {
    pb::NodeProto {
        op_type: op.into(),
        name,
        input: inputs,
        output: vec![output],
        attribute: attrs,
        ..Default::default()
    }
}

/// Decomposes every `Softmax` of an opset >= 13 graph (per-axis semantics; older opsets flatten
/// to 2-D and are left alone). Returns how many nodes were rewritten.
pub fn decompose_softmax(proto: &mut pb::ModelProto) -> usize {
    let version = opset(proto);
    if version < 13 {
        return 0;
    }
    let Some(graph) = proto.graph.as_mut() else {
        return 0;
    };
    let mut out = Vec::with_capacity(graph.node.len());
    let mut count = 0;
    for n in std::mem::take(&mut graph.node) {
        if n.op_type != "Softmax"
            || !(n.domain.is_empty() || n.domain == "ai.onnx")
            || n.input.len() != 1
        {
            out.push(n);
            continue;
        }
        let axis = n
            .attribute
            .iter()
            .find(|a| a.name == "axis")
            .map_or(-1, |a| a.i);
        let base = if n.name.is_empty() {
            format!("perch_softmax_{count}")
        } else {
            n.name.clone()
        };
        let x = n.input[0].clone();
        let y = n.output[0].clone();
        let axes_name = format!("{base}/perch_axes");
        graph.initializer.push(pb::TensorProto {
            name: axes_name.clone(),
            dims: vec![1],
            data_type: INT64,
            int64_data: vec![axis],
            ..Default::default()
        });
        let t = |s: &str| format!("{base}/perch_{s}");
        // ReduceMax takes axes as an input from opset 18, ReduceSum from opset 13.
        let max = if version >= 18 {
            node(
                "ReduceMax",
                t("max"),
                vec![x.clone(), axes_name.clone()],
                t("max_out"),
                vec![int_attr("keepdims", 1)],
            )
        } else {
            node(
                "ReduceMax",
                t("max"),
                vec![x.clone()],
                t("max_out"),
                vec![ints_attr("axes", &[axis]), int_attr("keepdims", 1)],
            )
        };
        out.push(max);
        out.push(node(
            "Sub",
            t("sub"),
            vec![x, t("max_out")],
            t("sub_out"),
            vec![],
        ));
        out.push(node(
            "Exp",
            t("exp"),
            vec![t("sub_out")],
            t("exp_out"),
            vec![],
        ));
        out.push(node(
            "ReduceSum",
            t("sum"),
            vec![t("exp_out"), axes_name],
            t("sum_out"),
            vec![int_attr("keepdims", 1)],
        ));
        out.push(node(
            "Div",
            t("div"),
            vec![t("exp_out"), t("sum_out")],
            y,
            vec![],
        ));
        count += 1;
    }
    graph.node = out;
    count
}

#[cfg(test)]
mod tests {
    use super::*;
    use tract_onnx::prelude::*;

    fn proto(rel: &str) -> pb::ModelProto {
        let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(rel);
        onnx().proto_model_for_path(p).unwrap()
    }

    #[test]
    fn rewrites_per_axis_softmax_only() {
        // YOLO11 at opset 13 and YOLO26 at opset 18: attention + DFL (or two attentions).
        for (f, n) in [
            ("tests/fixtures/y11-t160-op13.onnx", 2),
            ("tests/fixtures/y26-t160-op18.onnx", 2),
        ] {
            let mut p = proto(f);
            assert_eq!(decompose_softmax(&mut p), n, "{f}");
            let g = p.graph.as_ref().unwrap();
            assert!(g.node.iter().all(|n| n.op_type != "Softmax"));
            assert_eq!(
                g.node.iter().filter(|n| n.op_type == "ReduceSum").count(),
                n
            );
        }
        // Opset 11 Softmax flattens to 2-D: left alone.
        let mut p = proto("tests/fixtures/v8-t160-op11.onnx");
        assert_eq!(decompose_softmax(&mut p), 0);
    }
}
