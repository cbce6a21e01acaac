//! Transforms: `filter` and `map` apply a jq expression to each item, `route` sends items to
//! named outputs by jq conditions, `accumulate` folds items by key.

pub mod accumulate;
pub mod filter;
pub mod jq;
pub mod map;
pub mod route;
