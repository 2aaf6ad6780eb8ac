//! strata: a ZeRO-Infinity style training runtime.
