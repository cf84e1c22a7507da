"""Model updates on the vehicle (docs/model_updates.md): the model directory, the resumable download, the package
checks, the shadow run's figures and decision, and the state machine that drives them."""
