//! The transformer's conditioning for an SR model: its fixed text embedding, pooled vector and
//! guidance value repeated for a batch, and the rotary tables of a grid of image tokens. Nothing
//! of it changes over the steps of a sampling run or of a training run, so it is built once per
//! (batch, grid) and kept: neither the upscaler's Euler steps nor a training step uploads it again.

use super::model_dir::SrModel;
use crate::backend::Backend;
use crate::model::positions::image_ids;
use crate::model::Conditioning;
use anyhow::Result;
use loaders::HostTensor;
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

/// Built conditionings by (items, token rows, token columns).
type Built<B> = HashMap<(usize, usize, usize), Rc<Conditioning<B>>>;

/// Conditionings by (items, token rows, token columns).
pub struct Conditionings<B: Backend> {
    built: RefCell<Built<B>>,
}

impl<B: Backend> Default for Conditionings<B> {
    fn default() -> Self {
        Conditionings { built: RefCell::new(HashMap::new()) }
    }
}

impl<B: Backend + 'static> Conditionings<B> {
    /// The conditioning of `items` samples of `model` on a `rows x cols` grid of packed tokens,
    /// built at its first use.
    pub fn get(&self, b: &B, model: &SrModel<B>, items: usize, (rows, cols): (usize, usize)) -> Result<Rc<Conditioning<B>>> {
        let key = (items, rows, cols);
        if let Some(c) = self.built.borrow().get(&key) {
            return Ok(c.clone());
        }
        let repeat = |t: &HostTensor| {
            let mut shape = t.shape.clone();
            shape[0] = items;
            HostTensor::from_f32(shape, t.to_f32().repeat(items))
        };
        let lt = model.txt.shape[1];
        let txt_ids = HostTensor::from_f32(vec![items, lt, 3], vec![0.0; items * lt * 3]);
        let img_ids = HostTensor::from_f32(vec![items, rows * cols, 3], image_ids(rows, cols).repeat(items));
        let guidance = HostTensor::from_f32(vec![items], vec![model.config.guidance; items]);
        let c = Rc::new(Conditioning::new(b, &model.flux, &repeat(&model.txt), &repeat(&model.y), Some(&guidance), &txt_ids, &img_ids)?);
        self.built.borrow_mut().insert(key, c.clone());
        Ok(c)
    }
}
