//! Tier 3 (placeholder until the backend lands).
