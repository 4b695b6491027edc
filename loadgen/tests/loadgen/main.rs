//! loadgen's integration tests, one binary (`cargo nextest run -p loadgen
//! --test loadgen`): the command line, open-loop behaviour against a fake
//! order-api, and runs through the real pipeline.

mod common;

mod cli;
mod open_loop;
mod pipeline;
