"""Binding components: output bindings the app invokes and input bindings that call the app."""
