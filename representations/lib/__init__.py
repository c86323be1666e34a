"""Pure geometry and rendering libraries under the representation plugins (nothing here is registered)."""
