"""The teacher: Attribution by Unlearning (AbU with a diagonal Fisher, AbU+ with EK-FAC)."""
