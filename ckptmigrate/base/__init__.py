"""The vocabulary every layer speaks: how a version is parsed, a value printed, a name suggested."""
