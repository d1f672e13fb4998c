"""Click commands of the larger features, registered on the main CLI by ttcsim.cli."""
