//! Integration tests: the real `prompter` command run in process, on the shipped configuration,
//! pipelines, knowledge bases and recordings.

mod cli;
mod config_ui;
mod replay;
