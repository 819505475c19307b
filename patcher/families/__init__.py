"""Model families and concepts: recipes are data shipped with the package, parsed and validated here."""
