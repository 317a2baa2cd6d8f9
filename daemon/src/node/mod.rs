//! `wiremeshd node`: the node agent.
