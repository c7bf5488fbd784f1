//! What a loaded model takes and returns, and the check of a request against it.

use std::collections::HashSet;

use serde::Serialize;

use crate::{DataType, Error, NamedTensor};

/// One input or output of a model.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TensorSpec {
    /// Name as in the model graph.
    pub name: String,
    /// Element type.
    pub datatype: DataType,
    /// Dimensions; `-1` marks a dynamic dimension.
    pub shape: Vec<i64>,
}

impl TensorSpec {
    /// True when axis 0 exists and is dynamic, so requests can be batched along it.
    pub fn has_dynamic_batch(&self) -> bool {
        self.shape.first() == Some(&-1)
    }

    /// Checks a concrete shape against this spec (rank and every fixed dimension).
    pub fn accepts_shape(&self, shape: &[usize]) -> bool {
        shape.len() == self.shape.len()
            && shape.iter().zip(&self.shape).all(|(&d, &s)| s < 0 || d as i64 == s)
    }
}

/// Inputs and outputs of a loaded model.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ModelMetadata {
    /// Model inputs, in graph order.
    pub inputs: Vec<TensorSpec>,
    /// Model outputs, in graph order.
    pub outputs: Vec<TensorSpec>,
}

fn names(specs: &[TensorSpec]) -> String {
    specs.iter().map(|s| s.name.as_str()).collect::<Vec<_>>().join(", ")
}

/// Formats a model shape the way users write it: `[-1, 4]`.
pub fn format_shape(shape: &[i64]) -> String {
    format!("[{}]", shape.iter().map(i64::to_string).collect::<Vec<_>>().join(", "))
}

impl ModelMetadata {
    /// The input spec with this name.
    pub fn input(&self, name: &str) -> Option<&TensorSpec> {
        self.inputs.iter().find(|s| s.name == name)
    }

    /// The output spec with this name.
    pub fn output(&self, name: &str) -> Option<&TensorSpec> {
        self.outputs.iter().find(|s| s.name == name)
    }

    /// True when every input and output has a dynamic axis 0: requests can be merged along it.
    pub fn batchable(&self) -> bool {
        !self.inputs.is_empty()
            && self.inputs.iter().all(TensorSpec::has_dynamic_batch)
            && self.outputs.iter().all(TensorSpec::has_dynamic_batch)
    }

    /// Checks a request against the model: every input present once, known names, datatypes,
    /// ranks and fixed dimensions. Element counts are checked when the tensors were built.
    pub fn validate_inputs(&self, inputs: &[NamedTensor]) -> Result<(), Error> {
        let mut seen = HashSet::with_capacity(inputs.len());
        for input in inputs {
            let Some(spec) = self.input(&input.name) else {
                return Err(Error::invalid_input(format!(
                    "unknown input \"{}\"; the model's inputs are: {}",
                    input.name,
                    names(&self.inputs)
                )));
            };
            if !seen.insert(input.name.as_str()) {
                return Err(Error::invalid_input(format!("input \"{}\" is given twice", input.name)));
            }
            let t = &input.tensor;
            if t.datatype() != spec.datatype {
                return Err(Error::invalid_input(format!(
                    "input \"{}\" has datatype {}, the model expects {}",
                    input.name,
                    t.datatype(),
                    spec.datatype
                )));
            }
            if !spec.accepts_shape(t.shape()) {
                return Err(Error::invalid_input(format!(
                    "input \"{}\" has shape {:?}, the model expects {} (-1 = any size)",
                    input.name,
                    t.shape(),
                    format_shape(&spec.shape)
                )));
            }
        }
        if let Some(missing) = self.inputs.iter().find(|s| !seen.contains(s.name.as_str())) {
            return Err(Error::invalid_input(format!(
                "missing input \"{}\" ({} {}); the model needs: {}",
                missing.name,
                missing.datatype,
                format_shape(&missing.shape),
                names(&self.inputs)
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Tensor;

    fn meta() -> ModelMetadata {
        ModelMetadata {
            inputs: vec![TensorSpec { name: "x".into(), datatype: DataType::Fp32, shape: vec![-1, 4] }],
            outputs: vec![TensorSpec { name: "y".into(), datatype: DataType::Fp32, shape: vec![-1, 3] }],
        }
    }

    fn x(shape: Vec<usize>) -> NamedTensor {
        let n = shape.iter().product();
        NamedTensor::new("x", Tensor::from_vec(shape, vec![0f32; n]).unwrap())
    }

    #[test]
    fn accepts_matching_input() {
        meta().validate_inputs(&[x(vec![5, 4])]).unwrap();
        assert!(meta().batchable());
    }

    #[test]
    fn reports_each_mismatch_clearly() {
        let m = meta();
        let e = m.validate_inputs(&[x(vec![5, 3])]).unwrap_err().to_string();
        assert!(e.contains("has shape [5, 3], the model expects [-1, 4]"), "{e}");
        let e = m.validate_inputs(&[]).unwrap_err().to_string();
        assert!(e.contains("missing input \"x\""), "{e}");
        let e = m
            .validate_inputs(&[NamedTensor::new("z", Tensor::from_vec(vec![1], vec![0f32]).unwrap())])
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown input \"z\""), "{e}");
        let e = m
            .validate_inputs(&[NamedTensor::new("x", Tensor::from_vec(vec![1, 4], vec![0i64; 4]).unwrap())])
            .unwrap_err()
            .to_string();
        assert!(e.contains("datatype INT64, the model expects FP32"), "{e}");
        let e = m.validate_inputs(&[x(vec![1, 4]), x(vec![1, 4])]).unwrap_err().to_string();
        assert!(e.contains("given twice"), "{e}");
    }
}
