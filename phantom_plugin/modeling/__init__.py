"""Performance modelling: what a step costs (counts), how long it takes (step_model), priced at a GPU's datasheet
rates (datasheet). Torch-free except where a module says otherwise."""
